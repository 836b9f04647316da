"""Run under torchrun by test_distributed.py: `vit` itself, with torch.distributed.destroy_process_group reporting
how many DistributedDataParallel wrappers are still alive when a rank destroys its process group."""

import gc
import sys

import torch.distributed as dist

from vitcli.cli import app

destroy = dist.destroy_process_group


def reporting_destroy(*args, **kwargs):
    gc.unfreeze()  # the objects vitcli froze (runtime.settle) are hidden from gc.get_objects otherwise
    alive = sum(type(o).__name__ == "DistributedDataParallel" for o in gc.get_objects())
    print(f"ddp-probe: {alive} DistributedDataParallel alive at destroy_process_group", file=sys.stderr)
    return destroy(*args, **kwargs)


dist.destroy_process_group = reporting_destroy
app(prog_name="vit")
