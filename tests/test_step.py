"""The training step: train.grad_accum_steps runs each batch as micro-batches and trains the same weights."""

import pytest
import torch

from vitcli.bench import Workload
from vitcli.config import build_config
from vitcli.step import Forward


def workload(accum: int, **train) -> Workload:
    """Fixed synthetic batches, fp32, no dropout and the linear stem (no BatchNorm): micro-batches change only the
    order of float additions. MixUp makes the targets soft (one row per image), label smoothing stays on; no
    gradient clipping, which (like AdamW) would hide gradients of the wrong scale."""
    return Workload(build_config({"data": {"dataset": "synthetic", "image_size": 16, "mixup_alpha": 0.8},
                                  "model": {"patch_size": 4, "dim": 32, "depth": 2, "heads": 2},
                                  "train": {"batch_size": 12, "precision": "fp32", "device": "cpu", "lr": 1e-3,
                                            "grad_accum_steps": accum, "grad_clip": None, **train}}))


def same_training(one: torch.nn.Module, many: torch.nn.Module) -> None:
    """The last step's gradients (summed over micro-batches) agree to float32 round-off, and so do the
    weights, to within what AdamW makes of round-off: a gradient that is zero but for it (the key projection's bias:
    softmax ignores a shift of a query's scores) is divided by its own size, which turns ~1e-10 into a step of up to
    lr x 1e-2 (eps 1e-8)."""
    for (name, a), b in zip(one.named_parameters(), many.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-7, msg=name)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=3e-5, msg=name)


@pytest.mark.parametrize("accum", [2, 5])  # 5: micro-batches of 3 and 2 images, each weighted by its share
def test_micro_batches_train_the_same_weights(accum):
    one, many = workload(1), workload(accum)
    for _ in range(3):
        loss_one, loss_many = one.train_step(), many.train_step()
        assert loss_many == pytest.approx(loss_one, rel=1e-5)
    same_training(one.model, many.model)
    # the logits the training loop scores come back whole, in the batch's order
    x, targets = one.preprocess(one.images, one.labels, 99)
    _, logits_one = one.step_fn(x, targets, 0.0, 99)
    _, logits_many = many.step_fn(x, targets, 0.0, 99)
    torch.testing.assert_close(logits_many, logits_one, rtol=1e-4, atol=1e-5)


def test_micro_batches_with_a_gradient_scaler_and_under_ddp(tmp_path):
    """fp16's GradScaler scales each micro-batch's loss and unscales the sum once; a DistributedDataParallel model
    (one gloo process here) skips the exchange of gradients for all but the last micro-batch (no_sync)."""
    import torch.distributed as dist

    whole, scaled = workload(1, precision="fp16"), workload(3, precision="fp16")
    assert scaled.step_fn.scaler is not None
    for _ in range(2):  # the unscaled gradients, to fp16's rounding (0.3-0.6% of each tensor's largest here)
        assert scaled.train_step() == pytest.approx(whole.train_step(), rel=1e-3)
        for (name, a), b in zip(whole.model.named_parameters(), scaled.model.parameters()):
            assert float((b.grad - a.grad).abs().max()) <= 0.05 * float(a.grad.abs().max()) + 1e-9, name
    assert scaled.step_fn.scaler.get_scale() == whole.step_fn.scaler.get_scale() == 65536.0

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        one, many = workload(1), workload(3)
        ddp = torch.nn.parallel.DistributedDataParallel(many.model)
        many.step_fn.forward = Forward(ddp, compile=False)
        calls = []
        original = ddp.no_sync
        ddp.no_sync = lambda: (calls.append(1), original())[1]
        for _ in range(2):
            assert many.train_step() == pytest.approx(one.train_step(), rel=1e-5)
        assert len(calls) == 2 * 2  # two of each step's three micro-batches
        same_training(one.model, many.model)
    finally:
        dist.destroy_process_group()
