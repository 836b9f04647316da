"""DDP on CPU with gloo: `vit train --nproc 2` follows the single-process run of the same global batch."""

import json

import pytest
import torch

from conftest import REPO, run_vit

# fp32, no dropout: the only randomness is the data order and crop/flip, which both runs share exactly. The conv
# stem's BatchNorm normalises each rank's images with the global batch's statistics, as the single process does.
EQUAL = ["--config", REPO / "configs" / "smoke.yaml", "--set", "train.precision=fp32", "--set", "train.epochs=2",
         "--set", "data.max_train_samples=512", "--set", "model.stem=conv"]


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    single, work = tmp / "single", tmp / "work"
    run_vit("train", *EQUAL, "--run-dir", single, check=True)
    work.mkdir()
    result = run_vit("train", *EQUAL, "--nproc", "2", cwd=work, check=True)
    made = sorted((work / "runs").glob("*/*"))  # the default runs/NAME/TIMESTAMP: rank 0 makes it, every rank
    assert len(made) == 1 and made[0].parent.name == "smoke", made  # writes into it (not one folder per rank)
    return single, made[0], result


def test_two_ranks_follow_one_rank(runs):
    single, double, result = runs
    assert "2 processes" in result.stderr
    one, two = metrics(single), metrics(double)
    assert [r.get("epoch") for r in two] == [1, 2, None], "one metrics line per epoch, written once"
    # Same samples, same augmentation, gradients averaged over the same global batch: only the order of float
    # additions differs (the all-reduce), so the losses agree to float32 round-off compounded over 16 steps.
    for a, b in zip(one[:2], two[:2]):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-3)
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
        assert abs(b["val_top1"] - a["val_top1"]) <= 2 / 256
    w1 = torch.load(single / "last.pt", weights_only=True)["model"]
    w2 = torch.load(double / "last.pt", weights_only=True)["model"]
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-3


def test_ddp_checkpoint_evaluates_and_resumes_in_one_process(runs, tmp_path):
    import shutil

    _, double, _ = runs
    report = json.loads(run_vit("eval", "--ckpt", double / "best.pt", "--json", check=True).stdout)
    assert report["num_samples"] == 256  # the whole validation set, not a shard
    copy = tmp_path / "resumed"
    shutil.copytree(double, copy)
    run_vit("train", "--resume", copy / "last.pt", "--set", "train.epochs=3", check=True)
    assert [r.get("epoch") for r in metrics(copy)][-2:] == [3, None]


def test_batch_must_divide_over_ranks(tmp_path):
    result = run_vit("train", *EQUAL, "--set", "train.batch_size=63", "--run-dir", tmp_path / "r", "--nproc", "2")
    assert result.returncode != 0 and "does not divide over 2 processes" in result.stderr
    # micro-batches are of each process's share: 40 of the 64 images fit no share of 32
    result = run_vit("train", *EQUAL, "--set", "train.grad_accum_steps=40", "--run-dir", tmp_path / "r", "--nproc", "2")
    assert result.returncode != 0 and ("train.grad_accum_steps 40 is more micro-batches than the 32 images each of 2 "
                                       "processes takes of train.batch_size 64; set it at most 32") in result.stderr


def test_an_error_on_rank_0_is_its_one_line(runs):
    """A run directory that holds a run: rank 0 refuses in one line, the other rank stops without a traceback."""
    single, _, _ = runs
    result = run_vit("train", *EQUAL, "--run-dir", single, "--nproc", "2")
    assert result.returncode == 2, result.stderr
    # its one line only: not followed by torchrun's log record of the failed process and a line of our own
    assert result.stderr.count("vit: error: run directory") == 1 == result.stderr.count("vit: error:"), result.stderr
    assert "Traceback" not in result.stderr and "Connection closed" not in result.stderr, result.stderr
    assert "exitcode" not in result.stderr and "OMP_NUM_THREADS" not in result.stderr, result.stderr


def test_a_diverged_loss_under_two_ranks_is_one_line(tmp_path):
    """A loss that becomes NaN mid-run (after the start-up's objects were frozen, vitcli.runtime.settle): both ranks
    see it in the all-reduced sum; rank 0 says so once, the other stops without a word, and neither aborts while
    leaving the process group (DDP's reducer and gloo left to the exit aborted a rank: SIGABRT, exit 1)."""
    result = run_vit("train", *EQUAL, "--set", "train.lr=1e6", "--set", "train.grad_clip=null",
                     "--run-dir", tmp_path / "run", "--nproc", "2")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("vit: error:") == 1 == result.stderr.count("loss became"), result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "terminate called" not in result.stderr, result.stderr[-3000:]


def test_ctrl_c_stops_every_rank_after_it_saved(tmp_path):
    """Ctrl-C on `vit train --nproc 2`: torchrun hands the signal to both workers, they save and stop, and the
    command returns only then, leaving no process behind; resumed with 2 processes, the run ends bit for bit where
    an uninterrupted one does, dropout and stochastic depth included (each rank's own RNG stream is saved)."""
    import shlex
    import signal
    import subprocess
    import time

    from conftest import VIT

    noisy = [*map(str, EQUAL), "--set", "train.epochs=12", "--set", "model.dropout=0.1",
             "--set", "model.drop_path=0.1", "--nproc", "2"]
    run_vit("train", *noisy, "--run-dir", tmp_path / "reference", check=True)
    run_dir = tmp_path / "run"
    # a save at global step 10 (epoch 2, step 2 of 8; saves alter nothing) says epoch 2 is under way: stop there
    proc = subprocess.Popen([VIT, "train", *noisy, "--run-dir", str(run_dir), "--set", "train.checkpoint_every=10"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180

    def saved_step() -> int:
        last = run_dir / "last.pt"
        return torch.load(last, weights_only=True)["global_step"] if last.exists() else -1

    while saved_step() < 10:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Continue it with: " in err and "Traceback" not in err, err[-3000:]
    # rank 0 speaks for the run: one stop message, one resume command (each rank printed both)
    assert err.count("interrupt received") == 1 == err.count("Continue it with"), err[-3000:]
    command = shlex.split(err.split("Continue it with: ")[1].splitlines()[0])
    # as it ran: the vit the test started (its path, or `vit` where that is the one on PATH), --nproc 2
    assert command[0] in ("vit", VIT), command
    assert command[1:] == ["train", "--resume", str(run_dir / "last.pt"), "--nproc", "2"], command
    left = subprocess.run(["pgrep", "-f", str(run_dir)], capture_output=True, text=True).stdout
    assert left == "", f"processes still running: {left}"
    ckpt = torch.load(run_dir / "last.pt", weights_only=True)
    # inside an epoch after the first (epoch 2 unless the machine is loaded: the signal then reaches the workers a
    # few steps later): the stop that needs every rank's RNG state and the data position back
    assert ckpt["epoch"] >= 1 and 1 <= ckpt["step"] < 8, (ckpt["epoch"], ckpt["step"])
    run_vit(*command[1:], check=True)
    assert [r["epoch"] for r in metrics(run_dir) if "epoch" in r] == list(range(1, 13))
    resumed = torch.load(run_dir / "last.pt", weights_only=True)["model"]
    reference = torch.load(tmp_path / "reference" / "last.pt", weights_only=True)["model"]
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_process_launch_errors_are_one_line(tmp_path):
    """Mistakes in how the processes are started are one line, before any process or run directory exists: CUDA
    asked for on a machine without a GPU (each rank printed a traceback from torch.cuda.set_device), a batch that
    does not divide over the processes, WORLD_SIZE set without RANK (a KeyError)."""
    import os

    smoke = ["--config", REPO / "configs" / "smoke.yaml", "--run-dir", tmp_path / "run"]
    for args, needle in (
            (["--nproc", "2", "--device", "cuda"], "train.device=cuda: no CUDA GPU is visible"),
            (["--nproc", "3"], "does not divide over 3 processes"),
            (["--nproc", "9" * 20], f"--nproc {'9' * 20}: more processes than train.batch_size 64"),
            (["--nproc", "0"], "--nproc 0: the number of processes must be 1 or more"),
            (["--nproc", "2", "--set", f"model.init_from={tmp_path / 'nope.pt'}"],  # was one line per process
             "model.init_from: checkpoint not found"),
            (["--nproc", "2", "--set", "model.depth=100000000000"], "the config's model has at least")):
        result = run_vit("train", *smoke, *args)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert needle in result.stderr and result.stderr.count("vit: error:") == 1, result.stderr[-3000:]
        assert "launching: torchrun" not in result.stderr
    assert "RANK" not in os.environ
    result = run_vit("train", *smoke, env={"WORLD_SIZE": "2"})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "WORLD_SIZE=2 is set but RANK" in result.stderr
    # leftovers of a job script: RANK without torchrun's rendezvous address, a WORLD_SIZE that is not a number
    for env, needle in (({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "", "MASTER_PORT": ""},
                         "WORLD_SIZE=2 and RANK=0 are set but MASTER_ADDR and MASTER_PORT are not"),
                        ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not a number of processes")):
        result = run_vit("train", *smoke, env=env)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert needle in result.stderr and result.stderr.count("vit: error:") == 1, result.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def test_each_rank_frees_ddp_before_it_destroys_the_group(tmp_path):
    """A rank that destroyed its process group while DistributedDataParallel's reducer (which holds the group) was
    still alive left both to the interpreter's teardown, where a rank now and then aborted after a finished run
    ('terminate called without an active exception', SIGABRT: CI failed on it once). Each rank, after a run that
    finished and after one that failed, destroys its group once, with no DDP wrapper left."""
    import subprocess
    import sys

    def probe(*args):
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             str(REPO / "tests" / "ddp_teardown_probe.py"), "train", *map(str, EQUAL), *args],
            capture_output=True, text=True, timeout=600)
        reports = [line for line in result.stderr.splitlines() if line.startswith("ddp-probe:")]
        return result, reports

    finished, reports = probe("--set", "train.epochs=1", "--run-dir", tmp_path / "finished")
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert reports == ["ddp-probe: 0 DistributedDataParallel alive at destroy_process_group"] * 2, reports
    failed, reports = probe("--set", "train.lr=1e6", "--set", "train.grad_clip=null", "--run-dir", tmp_path / "nan")
    assert failed.returncode != 0 and "loss became" in failed.stderr, failed.stderr[-3000:]
    assert reports == ["ddp-probe: 0 DistributedDataParallel alive at destroy_process_group"] * 2, reports
