"""Attention maps, evaluation reports and TensorBoard pictures from a real training run."""

import collections
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, run_vit, write_png


def assert_picture(path, min_size):
    image = Image.open(path)
    image.verify()
    image = Image.open(path).convert("RGB")
    assert min(image.size) >= min_size, image.size
    array = np.asarray(image).astype(float)
    assert array.std() > 10, "the picture should not be blank"
    return image


def one_hot_attention(*targets: int, tokens: int = 5) -> torch.Tensor:
    """(1, heads, T, T): in head h every token attends only to token targets[h]."""
    a = torch.zeros(1, len(targets), tokens, tokens)
    for h, t in enumerate(targets):
        a[0, h, :, t] = 1
    return a


def test_attention_rollout_worked_by_hand():
    from vitcli.visualize import attention_rollout, last_layer_attention

    # tokens: 0 is the class token, 1..4 the patches. Each layer's matrix is (mean over heads + I) / 2.
    to_2, to_class = one_hot_attention(2), one_hot_attention(0)
    # one layer: the class token keeps half of itself and takes half from token 2 (patch 1)
    torch.testing.assert_close(attention_rollout([to_2]), torch.tensor([[0, 0.5, 0, 0]]))
    # two such layers: half of (1/2 e0 + 1/2 e2) plus half of token 2's row, which is all e2 -> 3/4 on patch 1
    torch.testing.assert_close(attention_rollout([to_2, to_2]), torch.tensor([[0, 0.75, 0, 0]]))
    # order matters: the later layer multiplies from the left
    torch.testing.assert_close(attention_rollout([to_2, to_class]), torch.tensor([[0, 0.5, 0, 0]]))
    torch.testing.assert_close(attention_rollout([to_class, to_2]), torch.tensor([[0, 0.25, 0, 0]]))
    # heads are averaged: one head looks at token 1, the other at token 3
    two_heads = one_hot_attention(1, 3)
    torch.testing.assert_close(attention_rollout([two_heads]), torch.tensor([[0.25, 0, 0.25, 0]]))
    torch.testing.assert_close(last_layer_attention([two_heads]), torch.tensor([[0.5, 0, 0.5, 0]]))
    # a batch is rolled out per image
    batch = torch.cat([to_2, to_class])
    torch.testing.assert_close(attention_rollout([batch, batch]), torch.tensor([[0, 0.75, 0, 0], [0, 0, 0, 0]]))


def test_position_similarity_maps_sit_on_the_patch_grid():
    """Tile (r, c) of the mosaic is patch (r, c)'s similarity map; orthogonal embeddings make each map one bright
    pixel, at the patch's own place. A 64x64 grid shows 16x16 evenly spaced patches, corners included, as one image
    (one matplotlib axis per patch took 70 s there)."""
    from vitcli.visualize import figure_to_array, position_similarity_figure, position_similarity_mosaic

    grid = 4
    pos = torch.cat([torch.zeros(1, 1, grid * grid), torch.eye(grid * grid)[None] * 3], dim=1)  # (1, 1 + N, D)
    mosaic, n = position_similarity_mosaic(pos)
    assert n == grid and mosaic.shape == (grid * (grid + 1) - 1,) * 2
    gaps = np.arange(grid, mosaic.shape[0], grid + 1)
    assert np.isnan(mosaic[gaps]).all() and np.isnan(mosaic[:, gaps]).all()
    for r in range(grid):
        for c in range(grid):
            tile = mosaic[r * (grid + 1):r * (grid + 1) + grid, c * (grid + 1):c * (grid + 1) + grid]
            expected = np.zeros((grid, grid))
            expected[r, c] = 1
            np.testing.assert_allclose(tile, expected, atol=1e-6)

    grid = 64
    pos = torch.randn(1, 1 + grid * grid, 8)
    mosaic, n = position_similarity_mosaic(pos)
    assert n == 16 and mosaic.shape == (16 * (grid + 1) - 1,) * 2
    unit = torch.nn.functional.normalize(pos[0, 1:], dim=1)
    last = (unit @ unit[-1]).view(grid, grid).numpy()  # patch (63, 63)'s map: the bottom right tile
    np.testing.assert_allclose(mosaic[-grid:, -grid:], last, atol=1e-5)
    first = (unit @ unit[0]).view(grid, grid).numpy()
    np.testing.assert_allclose(mosaic[:grid, :grid], first, atol=1e-5)
    # drawn at whole screen pixels per mosaic pixel: every one-pixel gap between maps shows, none is scaled away
    picture = figure_to_array(position_similarity_figure(pos))[-mosaic.shape[0]:]  # below the title
    assert picture.shape[:2] == mosaic.shape and picture.std() > 10
    blank = (picture == 255).all(axis=2)
    assert blank[:, np.arange(grid, mosaic.shape[0], grid + 1)].all()
    assert not blank[:, :grid].all(axis=0).any()  # a map's columns are drawn


def test_report_pictures_of_many_classes_stay_bounded():
    """An image folder of 1000 classes: the confusion matrix was drawn 60 px per class, a 60200 px square that ran
    out of memory after the training had finished (17.7 GB at 1100 classes). Now at most 2000 px a side, class
    indices instead of overlapping names; a report with no mistakes says so instead of a blank picture."""
    from vitcli.visualize import confusion_figure, figure_to_array, mistakes_figure, per_class_figure

    k = 1000
    confusion = np.eye(k, dtype=np.int64) * 3
    confusion[0, 1] = 1
    matrix = figure_to_array(confusion_figure(confusion, [f"class{i}" for i in range(k)]))
    chart = figure_to_array(per_class_figure({f"class{i}": 0.5 for i in range(k)}))
    assert max(matrix.shape[:2]) <= 2000 and max(chart.shape[:2]) <= 2000
    assert matrix.std() > 10 and chart.std() > 10
    few = figure_to_array(confusion_figure(confusion[:3, :3], ["a", "b", "c"]))
    assert max(few.shape[:2]) <= 500  # small class counts as before
    blank = figure_to_array(mistakes_figure([], []))
    middle = blank[blank.shape[0] // 2 - 10:blank.shape[0] // 2 + 10]  # below the title
    assert (middle < 128).any(), "the picture should say there were no mistakes"


def test_predict_attention_maps(smoke_run, tmp_path):
    image = write_png(tmp_path / "in.png", size=300, mode="RGB")
    for mode in ("rollout", "last"):
        out = tmp_path / f"{mode}.png"
        result = run_vit("predict", image, "--ckpt", smoke_run / "best.pt", "--attention", out,
                         "--attention-mode", mode, "--json", check=True)
        assert json.loads(result.stdout)[0]["attention"] == str(out)
        picture = assert_picture(out, 300)
        assert picture.size[0] >= 300
    # a long strip is drawn 2048 px on its longer side, at most (the picture is a square of that side: a 1 x 70000
    # strip ran out of memory in matplotlib)
    strip = tmp_path / "strip.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 5000), dtype=np.uint8)).save(strip)
    run_vit("predict", strip, "--ckpt", smoke_run / "best.pt", "--attention", tmp_path / "strip-map.png", check=True)
    assert Image.open(tmp_path / "strip-map.png").size == (2048, 2048 + 28)
    # the two modes draw different maps over the same image
    rollout, last = (np.asarray(Image.open(tmp_path / f"{m}.png").convert("RGB"), dtype=float) for m in ("rollout", "last"))
    assert rollout.shape == last.shape and np.abs(rollout - last).mean() > 1.0
    small = [write_png(tmp_path / f"s{i}.png", size=16, seed=i) for i in range(3)]
    folder = tmp_path / "maps"
    run_vit("predict", *small, "--ckpt", smoke_run / "best.pt", "--attention", folder, check=True)
    written = sorted(folder.glob("*.png"))
    assert [p.name for p in written] == ["s0.attention.png", "s1.attention.png", "s2.attention.png"]
    for path in written:
        assert_picture(path, 256)
    # a folder of images and their maps, twice: the maps vit wrote are not read as images (the second run was
    # refused: "would write over the input image"), and the text output names each image's picture
    inside = tmp_path / "inside"
    inside.mkdir()
    for path in small:
        (inside / path.name).write_bytes(path.read_bytes())
    for _ in range(2):
        result = run_vit("predict", inside, "--ckpt", smoke_run / "best.pt", "--attention", inside, check=True)
        assert [line.split(":")[0] for line in result.stdout.splitlines()] == [str(inside / p.name) for p in small]
        assert f"(attention: {inside / 's1.attention.png'})" in result.stdout
    assert len(list(inside.iterdir())) == 6
    # one image: OUT/ (or an existing folder) is a folder, a name without an extension gets .png
    result = run_vit("predict", small[0], "--ckpt", smoke_run / "best.pt", "--attention", f"{tmp_path / 'one'}/",
                     "--json", check=True)
    assert json.loads(result.stdout)[0]["attention"] == str(tmp_path / "one" / "s0.attention.png")
    assert_picture(tmp_path / "one" / "s0.attention.png", 256)
    result = run_vit("predict", small[0], "--ckpt", smoke_run / "best.pt", "--attention", tmp_path / "plain",
                     "--json", check=True)
    assert json.loads(result.stdout)[0]["attention"] == str(tmp_path / "plain.png")
    assert_picture(tmp_path / "plain.png", 256)


def test_eval_report(smoke_run, tmp_path):
    out = tmp_path / "report"
    run_vit("eval", "--ckpt", smoke_run / "best.pt", "--report", out, check=True)
    assert_picture(out / "confusion_matrix.png", 400)
    assert_picture(out / "per_class_accuracy.png", 300)
    assert_picture(out / "mistakes.png", 200)
    report = json.loads((out / "report.json").read_text())
    assert np.array(report["confusion"]).sum() == report["num_samples"] == 256
    assert len(report["per_class"]) == 10
    # which checkpoint and split it is about (a later report into the folder replaces it)
    assert {k: report[k] for k in ("checkpoint", "split", "dataset", "synthetic")} == {
        "checkpoint": str(smoke_run / "best.pt"), "split": "test", "dataset": "synthetic", "synthetic": True}
    mistakes = report["most_confident_mistakes"]
    confusion = np.array(report["confusion"])
    assert len(mistakes) == min(16, confusion.sum() - np.trace(confusion)) > 0
    assert all(m["true"] != m["predicted"] for m in mistakes)
    # the mistakes come from the same pass as the confusion matrix: each (true, predicted) pair is one of its cells
    index = {name: i for i, name in enumerate(report["classes"])}
    pairs = collections.Counter((index[m["true"]], index[m["predicted"]]) for m in mistakes)
    assert all(confusion[t, p] >= count for (t, p), count in pairs.items())
    assert [m["confidence"] for m in mistakes] == sorted((m["confidence"] for m in mistakes), reverse=True)
    # kept batch by batch (bounded memory): small batches find the same mistakes as one big one
    small = tmp_path / "small"
    run_vit("eval", "--ckpt", smoke_run / "best.pt", "--report", small, "--batch-size", "37", check=True)
    again = json.loads((small / "report.json").read_text())["most_confident_mistakes"]
    # (bf16 logits move a little with the batch size: compare away from the 16th mistake's confidence)
    floor = max(mistakes[-1]["confidence"], again[-1]["confidence"]) + 0.02 if len(mistakes) == 16 else 0.0
    assert {m["index"] for m in again if m["confidence"] > floor} <= {m["index"] for m in mistakes}
    assert {m["index"] for m in mistakes if m["confidence"] > floor} <= {m["index"] for m in again}
    first = {m["index"]: m for m in mistakes}
    for m in again:
        if m["index"] in first:
            assert m["predicted"] == first[m["index"]]["predicted"]
            assert abs(m["confidence"] - first[m["index"]]["confidence"]) < 0.02
    # a report replaces an earlier report of vit eval; a folder holding other files of those names is refused
    run_vit("eval", "--ckpt", smoke_run / "best.pt", "--report", small, check=True)
    assert json.loads((small / "report.json").read_text())["most_confident_mistakes"] == mistakes
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.json").write_text("my notes")
    (mine / "mistakes.png").write_bytes(b"my picture")
    refused = run_vit("eval", "--ckpt", smoke_run / "best.pt", "--report", mine)
    assert refused.returncode == 2 and "already holds mistakes.png, report.json" in refused.stderr, refused.stderr
    assert (mine / "report.json").read_text() == "my notes" and sorted(p.name for p in mine.iterdir()) == [
        "mistakes.png", "report.json"]
    # a report of vit eval with a picture of the user's in place of one of its own: the picture is kept (a real
    # PNG, which it replaced when report.json alone was checked)
    (small / "mistakes.png").write_bytes((out / "confusion_matrix.png").read_bytes().replace(b"vitcli", b"mine!!"))
    mine_png = (small / "mistakes.png").read_bytes()
    refused = run_vit("eval", "--ckpt", smoke_run / "best.pt", "--report", small)
    assert refused.returncode == 2 and "already holds mistakes.png, not" in refused.stderr, refused.stderr
    assert (small / "mistakes.png").read_bytes() == mine_png
    # a report of vitcli before the mark: its unmarked pictures, written just before its report.json, are replaced
    old = tmp_path / "old"
    run_vit("eval", "--ckpt", smoke_run / "best.pt", "--report", old, check=True)
    written_at = (old / "report.json").stat().st_mtime
    for name in ("confusion_matrix.png", "per_class_accuracy.png", "mistakes.png"):
        (old / name).write_bytes((old / name).read_bytes().replace(b"vitcli eval report", b"x" * 18))
        os.utime(old / name, (written_at - 1, written_at - 1))
    run_vit("eval", "--ckpt", smoke_run / "best.pt", "--report", old, check=True)
    assert b"vitcli eval report" in (old / "mistakes.png").read_bytes()


def test_tensorboard_holds_the_pictures(smoke_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(smoke_run), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()["images"]
    for tag in ("train/augmented_batch", "val/confusion_matrix", "val/attention_rollout",
                "model/position_embedding_similarity"):
        assert tag in tags, (tag, tags)
    assert len(events.Images("val/confusion_matrix")) == 3
    encoded = events.Images("val/attention_rollout")[-1]
    assert encoded.width >= 160 * 8 and encoded.height >= 160


def test_attention_pictures_keep_their_spacing_across_a_resume(tmp_path):
    """Drawn at the first evaluation, then at evaluations at least epochs/5 apart, and at the last. A resumed run
    started the spacing again (a 5-epoch run extended to 10: epochs 6, 8, 10 instead of 7, 9, 10)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    run_vit("train", "--config", REPO / "configs" / "smoke.yaml", "--set", "train.epochs=5", "--run-dir", run_dir,
            check=True)
    run_vit("train", "--resume", run_dir / "last.pt", "--set", "train.epochs=10", check=True)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epoch_at = {r["global_step"]: r["epoch"] for r in rows if "epoch" in r}
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    events.Reload()
    drawn = sorted(epoch_at[image.step] for image in events.Images("val/attention_rollout"))
    assert drawn == [1, 2, 3, 4, 5, 7, 9, 10], drawn
    # the run's hparams summary is the last session's (each session added an event file of its own)
    assert len(list((run_dir / "hparams").glob("events.out.tfevents.*"))) == 1


def test_attention_map_covers_what_the_model_saw():
    """Image folders are resized and centre-cropped: the heat map is drawn over that crop, not the whole image."""
    from PIL import Image

    from vitcli.config import build_config
    from vitcli.predict import image_to_tensor, view_box

    config = build_config({"data": {"dataset": "imagefolder", "image_size": 64}, "model": {"patch_size": 8}})
    yy, xx = np.mgrid[0:200, 0:400]
    original = Image.fromarray(np.stack([xx * 255 // 399, yy * 255 // 199, (xx + yy) % 256], -1).astype(np.uint8))
    seen = image_to_tensor(original, config).permute(1, 2, 0).numpy().astype(float)

    def as_model_input(box):
        cut = original.crop(tuple(round(v) for v in box)).resize((64, 64), Image.BILINEAR)
        return np.asarray(cut).astype(float)

    box = view_box(config, *original.size)
    assert 100 < box[0] < 125 and 5 < box[1] < 20 and box[2] - box[0] == pytest.approx(box[3] - box[1], abs=1)
    assert np.abs(as_model_input(box)[..., :2] - seen[..., :2]).mean() < 3  # the gradients (channel 2 wraps)
    assert np.abs(as_model_input((0, 0, 400, 200))[..., :2] - seen[..., :2]).mean() > 20  # the old, wrong box
    cifar = build_config({"data": {"dataset": "cifar10"}})
    assert view_box(cifar, 400, 200) == (0, 0, 400, 200)


def test_attention_picture_of_a_one_pixel_wide_image(tmp_path):
    """An image folder's centre crop of a 1 px wide (or tall) image is 0.875 px: cut to 0 px, it was a traceback
    from the heat map's resize, and `predict FOLDER --attention` wrote no picture for the images after it."""
    from PIL import Image

    from vitcli.config import build_config
    from vitcli.model import build_model
    from vitcli.predict import image_to_tensor, write_attention

    config = build_config({"data": {"dataset": "imagefolder", "image_size": 32},
                           "model": {"patch_size": 8, "dim": 32, "depth": 1, "heads": 2}})
    model = build_model(config, 3).eval()
    for size in ((1, 2), (1, 10), (100, 1)):
        image = Image.new("RGB", size, (200, 30, 30))
        out = write_attention(model, config, image_to_tensor(image, config), torch.device("cpu"), "rollout",
                              tmp_path / f"{size[0]}x{size[1]}.png", image, {"label": "a", "probability": 0.5})
        assert_picture(out, 200)


def test_attention_pictures_of_several_images_never_share_a_file():
    """`predict FOLDER --attention OUT/`: one picture per image, also where names repeat across folders or an
    image's own name is another's fallback (a-2.png beside two a.png: the third map overwrote a-2's)."""
    from pathlib import Path

    from vitcli.predict import attention_outputs

    for paths in ([Path("imgs/a-2.png"), Path("imgs/a.png"), Path("imgs/c/a.png")],
                  [Path("x/a.png"), Path("y/a.png"), Path("z/a.jpg"), Path("a-1.png"), Path("a-2.png")]):
        outputs = attention_outputs("maps/", paths)
        assert list(outputs) == paths and len(set(outputs.values())) == len(paths), outputs
        assert all(out.parent == Path("maps") and out.name.endswith(".attention.png") for out in outputs.values())


def test_nan_pixels_and_missing_glyphs_are_quiet():
    """A float image with NaN pixels printed numpy's cast warning with its source line; class names the default
    font lacks (CJK) printed two warning lines per glyph and per picture."""
    import warnings

    from PIL import Image

    from vitcli.predict import convert_image
    from vitcli.visualize import figure_to_array, per_class_figure

    pixels = np.full((4, 4), np.nan, dtype=np.float32)
    pixels[0, 0] = 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gray = np.asarray(convert_image(Image.fromarray(pixels, "F"), "L"))
        assert gray[0, 0] == 128 and not gray[1:].any()  # NaN pixels black
        assert figure_to_array(per_class_figure({"猫": 0.5, "犬": 0.7})).std() > 10
