"""MetricsWriter: every metric of a run goes through it, to metrics.jsonl and TensorBoard (rank 0 only)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any, Optional

import torch

from vitcli.checkpoint import RUN_DIR_FIX, atomic_write
from vitcli.config import Config

def _quiet_tensorboard_thread(args) -> None:
    """threading.excepthook: TensorBoard's writer thread dies with its OSError (full disk, say) and prints a
    traceback; the same error reaches MetricsWriter at its next write, which reports it in one line."""
    if isinstance(args.exc_value, OSError) and type(args.thread).__name__ == "_AsyncWriterThread":
        return
    threading.__excepthook__(args)


class MetricsWriter:
    """metrics.jsonl and TensorBoard, written by rank 0 only: every metric goes through here. TensorBoard is the
    secondary record: if its file cannot be written, one warning and the run goes on (metrics.jsonl and the
    checkpoints are written as before, and fail with one clear error of their own)."""

    def __init__(self, run_dir: Path, enabled: bool, resumed_at: Optional[tuple[int, int]] = None):
        """`resumed_at`: (epochs finished, global step) of the checkpoint a resumed run continues from."""
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            if resumed_at is not None:
                self.rewind(*resumed_at)
            threading.excepthook = _quiet_tensorboard_thread
            # purge_step: TensorBoard hides what the earlier session logged after the checkpoint (it is redone)
            self.tb = SummaryWriter(str(run_dir), purge_step=resumed_at[1] + 1 if resumed_at else None)

    def rewind(self, epochs_done: int, global_step: int) -> None:
        """A resumed run continues the log of its checkpoint: rows written after that checkpoint (a run killed
        between an epoch's row and its save; a torn last line) and the earlier session's final row (a run extended
        with more epochs writes its own at its end) are taken out, so every epoch has one row and the file one
        final row, at its end."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return
        lines = text.split("\n")
        lines, torn = lines[:-1], lines[-1]  # "" when the file ends with its newline, as every write leaves it
        kept, redone = [], []
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if not isinstance(row, dict) or not (row.get("final") or row.get("epoch", 0) > epochs_done):
                kept.append(line)
            elif not row.get("final"):
                redone.append(row["epoch"])
        if len(kept) == len(lines) and not torn:
            return
        atomic_write(self.path, lambda f: f.write("".join(line + "\n" for line in kept).encode()), "metrics log",
                     RUN_DIR_FIX)
        if redone or torn:
            what = f"the rows of epoch {', '.join(map(str, redone))}" if redone else ""
            what += (" and " if what else "") + ("a torn last line" if torn else "")
            print(f"vit: {self.path}: took out {what} written after the checkpoint (global step {global_step}); "
                  f"the resumed run writes them again", file=sys.stderr)

    def tensorboard(self, write) -> None:
        if not self.tb:
            return
        try:
            write(self.tb)
        except OSError as e:
            print(f"vit: warning: TensorBoard logging stopped, cannot write to {self.path.parent}: "
                  f"{e.strerror or e} (metrics.jsonl and checkpoints go on)", file=sys.stderr)
            self.tb = None

    def scalars(self, values: dict[str, float], step: int) -> None:
        def write(tb):
            for key, value in values.items():
                tb.add_scalar(key, value, step)

        self.tensorboard(write)

    def image(self, tag: str, array, step: int) -> None:
        """An RGB uint8 (H, W, 3) array."""
        self.tensorboard(lambda tb: tb.add_image(tag, array, step, dataformats="HWC"))

    def images(self, tag: str, batch: torch.Tensor, step: int) -> None:
        """A grid of float images in [0, 1], (B, C, H, W)."""
        if self.tb:
            from torchvision.utils import make_grid

            grid = make_grid(batch.float().cpu(), nrow=8, padding=1)
            self.tensorboard(lambda tb: tb.add_image(tag, grid, step))

    def record(self, row: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def close(self) -> None:
        self.tensorboard(lambda tb: tb.close())


@contextlib.contextmanager
def closed_on_error(writer: MetricsWriter):
    """A stop or an error closes the TensorBoard writer, so that the events its thread still holds reach the file
    (the exit does not: vit freezes its objects away from the last garbage collections, cli.run_command)."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):  # the error that stopped the run is the one to report
            writer.close()
        raise


def log_pictures(writer: MetricsWriter, model, config: Config, classes: list[str], val: dict[str, Any], watch,
                 device: torch.device, step: int, attention: bool) -> None:
    """The confusion matrix at each evaluation; attention overlays of the watched images every few epochs."""
    if not writer.tb:
        return
    import numpy as np

    from vitcli.visualize import attention_overlay_arrays, confusion_figure, figure_to_array

    writer.image("val/confusion_matrix", figure_to_array(confusion_figure(np.array(val["confusion"]), classes)),
                 step)
    if attention and watch is not None:
        overlays = attention_overlay_arrays(model, config, classes, watch[0], device, labels=watch[1])
        writer.image("val/attention_rollout", np.concatenate(overlays, axis=1), step)
