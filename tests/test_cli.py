"""End-to-end: the real `vit` command on data in the real on-disk formats."""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FASHION_MNIST, REPO, VIT, run_vit, write_png
from vitcli.data import FASHION_MNIST_CLASSES

TINY = ["--set", "model.dim=32", "--set", "model.depth=2", "--set", "model.heads=2", "--set", "train.epochs=2",
        "--set", "train.batch_size=64", "--set", "train.lr=0.003", "--set", "train.warmup_epochs=0.5"]


def test_help_is_instant_and_does_not_import_torch():
    code = "import sys, vitcli.cli; print(','.join(m for m in ('torch', 'torchvision') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
    result = run_vit("--help")
    assert result.returncode == 0 and "train" in result.stdout and "predict" in result.stdout
    for command in ("train", "eval", "predict", "bench"):
        assert run_vit(command, "--help").returncode == 0


def test_eval_and_predict_do_not_import_torchs_compiler():
    """torch._dynamo takes ~0.9 s to import; only a compiled run needs it (vitcli.model.prepare_compile)."""
    code = ("import sys, vitcli.train, vitcli.evaluate, vitcli.predict, vitcli.checkpoint, vitcli.visualize; "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_command_starts_with_the_collector_paused_and_leaves_its_objects_frozen():
    """Start-up imports run without the cyclic collector's full passes; settle() resumes it for the work, and at
    exit the objects are frozen, so the interpreter's last collections skip them (~2 s less per compiled run)."""
    code = ("import gc, json, typer\nfrom vitcli import cli\nseen = []\n"
            "def body():\n"
            "    from vitcli.runtime import settle\n"
            "    seen.append(gc.isenabled()); settle(); seen.append(gc.isenabled())\n"
            "    seen.append(gc.get_freeze_count() > 0)\n"
            "try:\n    cli.run_command(body)\nexcept typer.Exit as e:\n    seen.append(e.exit_code)\n"
            "print(json.dumps(seen + [gc.get_freeze_count() > 0]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [False, True, True, 0, True]


def test_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "vitcli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "train" in result.stdout


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_help_that_cannot_be_written_is_one_line():
    """Typer writes the help itself, outside the commands' error handling: a full disk was a traceback."""
    for args in (["--help"], ["train", "--help"]):
        with open("/dev/full", "w") as full:
            result = subprocess.run([VIT, *args], stdout=full, stderr=subprocess.PIPE, text=True)
        assert result.returncode == 1
        assert result.stderr == "vit: error: cannot write the output: No space left on device\n", result.stderr


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_smoke_train_eval_predict(smoke_run, tmp_path):
    run_dir = smoke_run
    for name in ("config.yaml", "last.pt", "best.pt", "metrics.jsonl"):
        assert (run_dir / name).is_file(), name
    rows = read_metrics(run_dir)
    epochs = [r for r in rows if "epoch" in r]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    assert rows[-1]["final"] and all(r.get("synthetic") for r in rows)
    best = max(r["val_top1"] for r in epochs)
    assert best > 0.2, "the smoke model should learn the synthetic classes beyond chance (0.1)"

    # TensorBoard event files hold the scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    scalars = events.Tags()["scalars"]
    for tag in ("train/loss", "train/lr", "val/top1", "val/loss", "perf/train_images_per_second"):
        assert tag in scalars, tag
    assert len(events.Scalars("val/top1")) == 3

    # eval reuses the training evaluation: same top-1 as the best epoch
    result = run_vit("eval", "--ckpt", run_dir / "best.pt", "--json", check=True)
    report = json.loads(result.stdout)
    assert report["top1"] == pytest.approx(best, abs=1e-6)
    assert report["num_samples"] == 256 and set(report) >= {"top1", "top5", "loss", "num_samples", "per_class"}
    assert len(report["per_class"]) == 10 and report["top5"] >= report["top1"]
    # a batch larger than the split is the split (2^66 was torch's "Overflow when unpacking long long" traceback)
    huge = json.loads(run_vit("eval", "--ckpt", run_dir / "best.pt", "--json", "--batch-size", str(2**66),
                              check=True).stdout)
    assert huge["batch_size"] == 256 and huge["top1"] == pytest.approx(best, abs=1e-6)
    text = run_vit("eval", "--ckpt", run_dir / "best.pt", "--data-root", tmp_path, check=True)
    assert "top-1" in text.stdout and "SYNTHETIC" in text.stdout
    assert "--data-root is not read: this checkpoint was trained on synthetic data" in text.stderr  # (silent)
    # the smoke recipe validates on 256 of the split's images: the count says so
    assert "256 images (of the split's 512, limited by the run's data.max_val_samples)" in text.stdout

    image = write_png(tmp_path / "x.png", size=50, mode="RGB")
    result = run_vit("predict", image, "--ckpt", run_dir / "best.pt", "--json", "--top-k", "3", check=True)
    (entry,) = json.loads(result.stdout)
    assert entry["path"] == str(image) and len(entry["predictions"]) == 3
    probs = [p["probability"] for p in entry["predictions"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    assert {"label", "index", "probability"} <= set(entry["predictions"][0])
    assert "--top-k" not in result.stderr
    every = run_vit("predict", image, "--ckpt", run_dir / "best.pt", "--json", "--top-k", "12", check=True)
    assert len(json.loads(every.stdout)[0]["predictions"]) == 10  # (was silent)
    assert "note: --top-k 12 is more than the checkpoint's 10 classes: showing all 10" in every.stderr
    assert "note: this checkpoint was trained on SYNTHETIC data" in every.stderr
    # an image that cannot be read: its error is the last line (the synthetic note came after it), exit 1
    (tmp_path / "bad.png").write_text("not a picture")
    bad = run_vit("predict", image, tmp_path / "bad.png", "--ckpt", run_dir / "best.pt")
    assert bad.returncode == 1 and bad.stderr.splitlines()[-1].startswith("vit: error: "), bad.stderr
    assert "bad.png: not an image" in bad.stderr.splitlines()[-1] and "SYNTHETIC" in bad.stderr


def test_eval_every_skips_evaluations_but_not_the_last(tmp_path):
    every = tmp_path / "every2"
    result = run_vit("train", "--config", REPO / "configs" / "smoke.yaml", "--run-dir", every,
                     "--set", "train.epochs=5", "--set", "train.eval_every=2", check=True)
    assert result.stderr.count("not evaluated: train.eval_every is 2") == 2
    rows = read_metrics(every)
    epochs = [r for r in rows if "epoch" in r]
    assert [r["epoch"] for r in epochs if "val_top1" in r] == [2, 4, 5]  # every 2nd epoch, and the last
    assert all("train_loss" in r and "val_loss" not in r for r in epochs if r["epoch"] in (1, 3))
    assert rows[-1]["test_top1"] == epochs[-1]["val_top1"]
    best = max(epochs, key=lambda r: r.get("val_top1", -1))
    assert rows[-1]["best_val_top1"] == best["val_top1"]
    assert torch.load(every / "best.pt", weights_only=False)["metrics"]["epoch"] == best["epoch"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(every))
    events.Reload()
    step_of = {r["epoch"]: r["global_step"] for r in epochs}
    assert [e.step for e in events.Scalars("val/top1")] == [step_of[2], step_of[4], step_of[5]]
    assert len(events.Scalars("train/epoch_loss")) == 5

    # skipping evaluations changes what is measured, not what is trained: the same weights as evaluating each epoch
    each = tmp_path / "every1"
    run_vit("train", "--config", REPO / "configs" / "smoke.yaml", "--run-dir", each, "--set", "train.epochs=5",
            check=True)
    a = torch.load(every / "last.pt", weights_only=False)["model"]
    b = torch.load(each / "last.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_metrics(each)[-1]["test_top1"] == rows[-1]["test_top1"]


def test_ckpt_defaults_to_newest_run(smoke_run, tmp_path):
    import shutil

    import os

    for name, age in (("a", 3600), ("m", 0), ("x", 7200)):  # "m" is the newest and neither first nor last by name
        (tmp_path / "runs" / "smoke" / name).mkdir(parents=True)
        copy = shutil.copy(smoke_run / "best.pt", tmp_path / "runs" / "smoke" / name / "best.pt")
        os.utime(copy, (os.path.getmtime(copy) - age,) * 2)
    result = run_vit("eval", "--json", cwd=tmp_path, check=True)
    assert "runs/smoke/m/best.pt" in result.stderr and json.loads(result.stdout)["num_samples"] == 256
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_vit("predict", "x.png", cwd=empty)
    assert result.returncode != 0 and "vit train" in result.stderr and "--ckpt" in result.stderr


def test_cifar10_real_format(cifar10_dir, tmp_path):
    run_dir = tmp_path / "run"
    run_vit("train", "--config", REPO / "configs" / "cifar10.yaml", "--run-dir", run_dir, "--set",
            f"data.root={cifar10_dir}", "--set", "data.download=false", *TINY, "--set", "train.compile=false",
            check=True)  # the format, not compile; no download, so the moved dataset below is not fetched again
    report = json.loads(run_vit("eval", "--ckpt", run_dir / "best.pt", "--json", check=True).stdout)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert report["num_samples"] == 100
    assert set(report["per_class"]) == set(names)  # all ten occur among the fixture's 100 test images
    ckpt = torch.load(run_dir / "best.pt", weights_only=True)
    assert ckpt["classes"] == names and ckpt["config"]["data"]["dataset"] == "cifar10"  # from batches.meta
    # the dataset moved since training: vit eval says where it looked and how to point it elsewhere, then does
    moved = cifar10_dir.rename(tmp_path / "moved")
    missing = run_vit("eval", "--ckpt", run_dir / "best.pt")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr, missing.stderr
    assert str(cifar10_dir) in missing.stderr and "--data-root DIR" in missing.stderr, missing.stderr
    assert "data.download" not in missing.stderr, "advice vit eval cannot follow (it takes no --set)"
    report = json.loads(run_vit("eval", "--ckpt", run_dir / "best.pt", "--data-root", moved, "--json",
                                check=True).stdout)
    assert report["num_samples"] == 100


def test_fashion_mnist_idx_files(fmnist_idx, tmp_path):
    run_dir = tmp_path / "run"
    trained = run_vit("train", "--config", REPO / "configs" / "fashion_mnist.yaml", "--run-dir", run_dir, "--set",
                      f"data.root={fmnist_idx}", "--set", "train.ema_decay=0", "--set", "train.compile=false",
                      "--set", "train.eval_hflip=true", *TINY, check=True)
    assert "with test-time flips (single view " in trained.stderr  # the epoch line says which figure it gives
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert "val/top1_single_view" in events.Tags()["scalars"]
    report = json.loads(run_vit("eval", "--ckpt", run_dir / "best.pt", "--json", check=True).stdout)
    assert report["num_samples"] == 128
    assert "limited by" not in run_vit("eval", "--ckpt", run_dir / "best.pt", check=True).stdout  # the whole split
    assert set(report["per_class"]) == set(FASHION_MNIST_CLASSES)  # the idx files carry no names: vitcli's own
    # test-time flips: the run's final figure is with them (and says so), the single-view one beside it; a fresh
    # `vit eval` of last.pt gives each again, with the checkpoint's setting by default and --no-tta without
    final = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["final"] and final["tta_hflip"] is True
    with_tta = json.loads(run_vit("eval", "--ckpt", run_dir / "last.pt", "--json", check=True).stdout)
    single = json.loads(run_vit("eval", "--ckpt", run_dir / "last.pt", "--json", "--no-tta", check=True).stdout)
    assert with_tta["tta_hflip"] is True and single["tta_hflip"] is False
    assert with_tta["top1"] == final["test_top1"] and single["top1"] == final["test_top1_single_view"]
    assert with_tta["top1_single_view"] == single["top1"]
    last_epoch = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-2]
    assert last_epoch["val_loss"] == pytest.approx(with_tta["loss"], rel=1e-6)  # the run's own evaluation had it
    assert with_tta["loss"] != single["loss"]  # (band images look nearly the same mirrored: 1e-4 apart)
    image = write_png(tmp_path / "gray.png", size=28, mode="L")
    out = json.loads(run_vit("predict", image, "--ckpt", run_dir / "best.pt", "--json", "--top-k", "10",
                             check=True).stdout)
    predictions = out[0]["predictions"]  # every class once, best first, a probability distribution
    assert [p["label"] for p in predictions] == [FASHION_MNIST_CLASSES[p["index"]] for p in predictions]
    assert sorted(p["label"] for p in predictions) == sorted(FASHION_MNIST_CLASSES)
    assert [p["probability"] for p in predictions] == sorted((p["probability"] for p in predictions), reverse=True)
    assert sum(p["probability"] for p in predictions) == pytest.approx(1.0, abs=1e-4)
    # --tta (the checkpoint's default here): the mean of the image's and its mirror image's probabilities
    from PIL import Image, ImageOps

    image, mirror = tmp_path / "half.png", tmp_path / "mirror.png"
    half = Image.new("L", (28, 28))
    half.paste(255, (0, 0, 10, 28))  # bright on the left only: its mirror is another picture for the model
    half.save(image)
    ImageOps.mirror(half).save(mirror)
    by_label = {}
    for path, flag in ((image, "--no-tta"), (mirror, "--no-tta"), (image, "--tta")):
        out = json.loads(run_vit("predict", path, "--ckpt", run_dir / "best.pt", "--json", "-k", "10", flag,
                                 check=True).stdout)
        by_label[path, flag] = {p["label"]: p["probability"] for p in out[0]["predictions"]}
    for label in FASHION_MNIST_CLASSES:
        mean = (by_label[image, "--no-tta"][label] + by_label[mirror, "--no-tta"][label]) / 2
        assert by_label[image, "--tta"][label] == pytest.approx(mean, abs=1e-5)
    assert by_label[image, "--no-tta"] != pytest.approx(by_label[mirror, "--no-tta"], abs=1e-5)


def test_imagefolder(imagefolder_dir, tmp_path):
    run_dir = tmp_path / "run"
    # --run-dir and data.root relative to where the run starts: the evaluation command it prints works from anywhere
    assert run_dir.parent == imagefolder_dir.parent
    # hidden folders and files are not data: torchvision's ImageFolder took .ipynb_checkpoints for a class, and
    # macOS's ._name files stopped a run at its first evaluation
    for split in ("train", "val"):
        (imagefolder_dir / split / ".ipynb_checkpoints").mkdir()
        write_png(imagefolder_dir / split / ".ipynb_checkpoints" / "0.png", size=32, mode="RGB")
        (imagefolder_dir / split / "circle" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    trained = run_vit("train", "--config", REPO / "configs" / "imagefolder.yaml", "--run-dir", run_dir.name,
                      "--set", f"data.root={imagefolder_dir.name}", "--set", "data.image_size=32",
                      "--set", "model.patch_size=8", "--set", "data.num_workers=1", *TINY[:-6], "--set",
                      "train.epochs=2", "--set", "train.batch_size=16", cwd=imagefolder_dir.parent, check=True)
    printed = next(line for line in trained.stderr.splitlines() if line.startswith("vit: evaluate it with: "))
    assert f"eval --ckpt {run_dir / 'best.pt'} --data-root {imagefolder_dir}" in printed, printed
    report = json.loads(run_vit("eval", *shlex.split(printed.split(" eval ", 1)[1]), "--json", cwd=REPO,
                                check=True).stdout)
    assert report["num_samples"] == 24 and set(report["per_class"]) == {"circle", "square", "stripe"}
    assert report["split"] == "val"  # no test/ yet: val/ is what was scored (it said "test")
    assert "3 classes" in trained.stderr
    # a test/ folder beside train/ and val/ is the test split vit eval scores (val/ picked best.pt); --split val
    # is still val/
    for name in ("circle", "square", "stripe"):
        (imagefolder_dir / "test" / name).mkdir(parents=True)
        for i in range(2):
            shutil.copy(imagefolder_dir / "val" / name / f"{i}.jpg", imagefolder_dir / "test" / name)
    tested = run_vit("eval", "--ckpt", run_dir / "best.pt", "--data-root", imagefolder_dir, check=True)
    assert f"{run_dir / 'best.pt'} on imagefolder test: 6 images" in tested.stdout, tested.stdout
    assert "  top-3 " in tested.stdout  # of 3 classes (it said top-5)
    on_val = run_vit("eval", "--ckpt", run_dir / "best.pt", "--data-root", imagefolder_dir, "--split", "val",
                     "--json", check=True)
    assert json.loads(on_val.stdout)["num_samples"] == 24 and json.loads(on_val.stdout)["split"] == "val"
    predicted = run_vit("predict", imagefolder_dir / "val" / "circle", "--ckpt", run_dir / "best.pt", "--json",
                        check=True)
    out = json.loads(predicted.stdout)
    assert len(out) == 8 and out[0]["predictions"][0]["label"] in ("circle", "square", "stripe")
    # another dataset's folders: both class lists and how to fix it (it said only "differ from the checkpoint's")
    other = tmp_path / "other"
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            (other / split / name).mkdir(parents=True)
            write_png(other / split / name / "0.png", size=32, mode="RGB")
    wrong = run_vit("eval", "--ckpt", run_dir / "best.pt", "--data-root", other)
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1 and "Traceback" not in wrong.stderr, wrong.stderr
    assert (f"the val split's classes in {other} (2: cat, dog) are not the checkpoint's (3: circle, square, "  # read
            f"stripe); evaluate it on the data it was trained for (--data-root DIR") in wrong.stderr, wrong.stderr
    # the default top-k (5) shows all of 3 classes without a note about a --top-k the user did not give
    assert {p["label"] for p in out[0]["predictions"]} == {"circle", "square", "stripe"}
    assert "--top-k" not in predicted.stderr, predicted.stderr

    # the evaluation's DataLoader does not draw from the training's random stream (drop_path is on in this recipe):
    # skipping the first epoch's evaluation trains the same weights
    skipped = tmp_path / "skipped"
    run_vit("train", "--config", REPO / "configs" / "imagefolder.yaml", "--run-dir", skipped,
            "--set", f"data.root={imagefolder_dir}", "--set", "data.image_size=32", "--set", "model.patch_size=8",
            "--set", "data.num_workers=1", *TINY[:-6], "--set", "train.epochs=2", "--set", "train.batch_size=16",
            "--set", "train.eval_every=2", check=True)
    a = torch.load(run_dir / "last.pt", weights_only=False)["model"]
    b = torch.load(skipped / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    # a class folder renamed before a resume: refused (output 0 went on to learn "square" without a word)
    for split in ("train", "val", "test"):
        (imagefolder_dir / split / "circle").rename(imagefolder_dir / split / "zcircle")
    resumed = run_vit("train", "--resume", skipped / "last.pt", "--set", "train.epochs=3", cwd=imagefolder_dir.parent)
    assert resumed.returncode == 2 and "Traceback" not in resumed.stderr, resumed.stderr
    assert (f"the training data's classes in {imagefolder_dir} (3: square, stripe, zcircle) are not the "
            f"checkpoint's (3: circle, square, stripe): its outputs would change meaning") in resumed.stderr
    assert [json.loads(line).get("epoch") for line in (skipped / "metrics.jsonl").read_text().splitlines()] == [
        1, 2, None]


def test_printed_commands_start_vit_as_the_user_did(smoke_run):
    """The resume command a refused run directory prints: `vit` where that is the vit on PATH, else the path the
    user ran (a venv not activated), and `python -m vitcli` when run so."""
    args = ["train", "--config", REPO / "configs" / "smoke.yaml", "--run-dir", smoke_run]
    without = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                              if not p or shutil.which("vit", path=p) is None)
    cases = {"vit": {"PATH": os.pathsep.join([os.path.dirname(VIT), without])}, shlex.quote(VIT): {"PATH": without}}
    for program, env in cases.items():
        result = run_vit(*args, env=env)
        assert result.returncode == 2 and f"{program} train --resume " in result.stderr, (program, result.stderr)
    result = subprocess.run([sys.executable, "-m", "vitcli", *map(str, args)], capture_output=True, text=True,
                            env={**os.environ, "PATH": without})
    python = shutil.which("python", path=without)
    same = python and os.path.abspath(python) == os.path.abspath(sys.executable)
    assert f"{'python' if same else shlex.quote(sys.executable)} -m vitcli train --resume " in result.stderr, \
        result.stderr
    # how the user says they start vit (a runner such as `uv run vit`), as it is
    result = run_vit(*args, env={"VIT_PROGRAM": "uv run vit"})
    assert result.returncode == 2 and "uv run vit train --resume " in result.stderr, result.stderr


def test_run_directory_is_never_overwritten(smoke_run, tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in smoke_run.iterdir()}
    result = run_vit("train", "--config", REPO / "configs" / "smoke.yaml", "--run-dir", smoke_run)
    assert result.returncode == 2 and "already holds" in result.stderr and "Traceback" not in result.stderr
    assert "vit train --resume" in result.stderr
    assert {p.name: p.stat().st_mtime_ns for p in smoke_run.iterdir()} == before
    # a run that stopped before its first checkpoint: no resume command to a last.pt that is not there
    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "config.yaml").write_text("name: smoke\n")
    result = run_vit("train", "--config", REPO / "configs" / "smoke.yaml", "--run-dir", failed)
    assert result.returncode == 2 and "no last.pt to resume" in result.stderr and "--resume" not in result.stderr
    # a folder of the user's that is no run (., ~, runs/): never the advice to delete it
    mine = tmp_path / "home"
    mine.mkdir()
    (mine / "thesis.tex").write_text("mine")
    for folder, cwd in ((mine, None), (".", mine)):
        result = run_vit("train", "--config", REPO / "configs" / "smoke.yaml", "--run-dir", folder, cwd=cwd)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert (f"run directory {folder} already holds files and is not a vit run (no config.yaml of a vit run); "
                f"choose a new or empty --run-dir, such as {Path(folder) / 'my-run'}") in result.stderr, result.stderr
        assert "delete" not in result.stderr
        (mine / "config.yaml").write_text("learning_rate: 0.1\n")  # a project's own config.yaml: no run either
    assert sorted(p.name for p in mine.iterdir()) == ["config.yaml", "thesis.tex"]
    # a file given as the run directory: said so (it was "Not a directory")
    result = run_vit("train", "--config", REPO / "configs" / "smoke.yaml", "--run-dir", failed / "config.yaml")
    assert result.returncode == 2 and "config.yaml is a file, not a folder; choose another --run-dir" in result.stderr


def test_a_tilde_in_a_path_option_is_the_home_folder(smoke_run, tmp_path):
    """The shell leaves '~' as it is after '=' (--out=~/m.onnx): vit expands it, as for data.root (it made a
    folder named '~' in the current one, an invitation to rm -rf ~)."""
    from conftest import write_png

    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    home.mkdir()
    shutil.copy(smoke_run / "best.pt", home / "best.pt")
    write_png(home / "x.png")
    import matplotlib

    env = {"HOME": str(home), "MPLCONFIGDIR": matplotlib.get_cachedir()}  # its font cache, not a new one in HOME
    run_vit("export", "--ckpt=~/best.pt", "--format", "safetensors", "--out=~/m.safetensors", cwd=work, env=env,
            check=True)
    result = run_vit("predict", "~/x.png", "--ckpt=~/best.pt", "--attention=~/maps/", "--json", cwd=work, env=env,
                     check=True)
    assert json.loads(result.stdout)[0]["attention"] == str(home / "maps" / "x.attention.png")
    assert (home / "m.safetensors").is_file() and (home / "maps" / "x.attention.png").is_file()
    assert list(work.iterdir()) == []


def test_default_run_directories_started_in_one_second_differ(tmp_path, monkeypatch):
    """Runs of one recipe started in the same second (a seed sweep started with &) each get a folder of their own:
    the default name is made on the spot, with -2, -3 after the first."""
    from vitcli.config import load_config
    from vitcli.rundir import default_run_dir

    config = load_config(REPO / "configs" / "smoke.yaml")
    for attempt in range(5):
        (tmp_path / str(attempt)).mkdir()
        monkeypatch.chdir(tmp_path / str(attempt))
        folders = [default_run_dir(config) for _ in range(3)]
        if len({f.name.split("-")[1] for f in folders}) == 1:
            break  # else a new second began between them: again
    assert len(set(folders)) == 3 and all(f.is_dir() and not any(f.iterdir()) for f in folders), folders
    assert [f.name for f in folders[1:]] == [f"{folders[0].name}-2", f"{folders[0].name}-3"]
    assert str(folders[0].parent) == os.path.join("runs", "smoke")


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist_learns(tmp_path):
    """One short epoch on a real subset must reach what only a model that learned can (chance is 10%).
    It runs the recipe's own path, torch.compile included (no eager fallback), with EMA off (one epoch is too
    short for the recipe's EMA to catch up)."""
    run_dir = tmp_path / "run"
    result = run_vit("train", "--config", REPO / "configs" / "fashion_mnist.yaml", "--run-dir", run_dir,
                     "--set", "data.max_train_samples=12800", "--set", "data.max_val_samples=2000",
                     "--set", "train.epochs=1", "--set", "train.warmup_epochs=0.2", "--set", "train.ema_decay=0",
                     check=True)
    assert "torch.compile failed" not in result.stderr and "eagerly" not in result.stderr  # train and eval compiled
    if not torch.cuda.is_available():  # torch's warning about CUDA_HOME, across the bar, on every compiled CPU run
        assert "No CUDA runtime is found" not in result.stderr, result.stderr[-2000:]
    report = json.loads(run_vit("eval", "--ckpt", run_dir / "best.pt", "--json", check=True).stdout)
    assert report["num_samples"] == 2000
    assert report["top1"] > 0.65, report


def test_bench_reports_the_train_step_and_its_flops():
    # smoke.yaml runs eagerly: a compile_mode without train.compile is said to do nothing (it was silently ignored)
    result = run_vit("bench", "--config", REPO / "configs" / "smoke.yaml", "--steps", "2", "--json",
                     "--set", "train.compile_mode=max-autotune", check=True)
    assert result.stderr.count("train.compile_mode max-autotune has no effect without train.compile: true") == 1
    out = json.loads(result.stdout)
    assert out["compile"] is False and out["compile_mode"] is None
    assert out["train_images_per_second"] > 0 and out["infer_images_per_second"] > 0
    assert out["precision"] in ("fp32", "bf16") and out["device"] == "cpu"
    assert out["train_gflops_per_second"] > 0
    # the FLOPs `vit bench` reports are those torch's own counter finds in one forward pass of the model
    from torch.utils.flop_counter import FlopCounterMode

    from vitcli.config import load_config
    from vitcli.model import build_model

    from vitcli.bench import forward_flops

    def counted(config, channels: int, full_last_block: bool = False) -> int:
        model = build_model(config, 10).eval()
        x = torch.randn(1, channels, config.image_size, config.image_size)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model.forward_head(model.forward_features(x)) if full_last_block else model(x)
        return counter.get_total_flops()

    smoke = load_config(REPO / "configs" / "smoke.yaml")
    assert out["forward_gflops_per_image"] * 1e9 == pytest.approx(counted(smoke, 3), rel=1e-9)
    conv_stem = load_config(REPO / "configs" / "fashion_mnist.yaml")  # the count follows the stem's convolutions
    assert forward_flops(conv_stem, 10) == pytest.approx(counted(conv_stem, 1), rel=1e-9)
    # the full last block (timm's way) is more work, and counted as such
    full = forward_flops(smoke, 10, class_token_only=False)
    assert full == pytest.approx(counted(smoke, 3, full_last_block=True), rel=1e-9) and full > forward_flops(smoke, 10)
