"""The one error type a user can cause. The CLI prints it as one line and exits non-zero, without a traceback."""


class VitError(Exception):
    """A mistake the user can fix: bad config, missing file, wrong checkpoint. The message says what, where and how."""


class Interrupted(Exception):
    """Training was stopped by Ctrl-C / SIGTERM after `last.pt` was written."""
