import datetime
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_vit
from vitcli.config import build_config, load_config, unread_keys_note
from vitcli.errors import VitError


def test_precedence_defaults_file_then_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  dim: 64\n  heads: 4\ntrain:\n  epochs: 3\n")
    config = load_config(path, ["train.epochs=7", "data.mean=[0.5,0.5,0.5]", "data.std=[0.2,0.2,0.2]"])
    assert config.model.dim == 64  # file
    assert config.train.epochs == 7  # --set beats the file
    assert config.model.depth == 6  # default
    assert config.data.mean == [0.5, 0.5, 0.5]


def test_ints_are_accepted_for_floats_and_resolved_values():
    config = build_config({"train": {"lr": 1}, "data": {"dataset": "fashion_mnist"}})
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert build_config({}, ["train.lr=3e-4"]).train.lr == 3e-4  # YAML 1.1 reads 3e-4 as a string
    assert config.image_size == 28 and config.mean == [0.2860]
    # CIFAR shrunk to 16: its crop is cut at 32, where padding 20 leaves image in every crop (it was refused)
    assert build_config({"data": {"image_size": 16, "crop_padding": 20}}).crop_padding == 20
    # a checkpoint of a version that checked it against image_size still loads
    assert build_config({"data": {"image_size": 64, "crop_padding": 40}}, saved=True).crop_padding == 40


@pytest.mark.parametrize("raw,message", [
    ({"model": {"dimm": 3}}, "did you mean 'model.dim'"),  # the key as it is written in --set
    ({"train": {"zzzzqq": 3}}, "unknown key 'train.zzzzqq'; valid keys in train: batch_size, checkpoint_every"),
    ({"trian": {}}, "did you mean 'train'"),
    # every unknown name at once (a file with three typos took three runs)
    ({"model": {"depht": 3, "dim": 64}, "trian": {}, "data": {"zzzzqq": 1}},
     r"my.yaml: unknown keys 'model.depht' \(did you mean 'model.depth'\?\), 'trian' \(did you mean 'train'\?\), "
     r"'data.zzzzqq'; the valid ones are in the README's Configs table$"),
    ({"train": {"epochs": "ten"}}, "train.epochs: expected a whole number"),
    ({"train": {"compile": "yes"}}, "expected true or false"),
    ({"model": {"dim": 100, "heads": 3}}, "dim 100 is not divisible by heads 3"),
    ({"model": {"patch_size": 5}}, "image_size 32 is not divisible by patch_size 5"),
    ({"train": {"epochs": 0}}, "train.epochs must be positive"),
    ({"train": {"batch_size": -1}}, "train.batch_size must be positive"),
    ({"train": {"eval_every": 0}}, "train.eval_every must be >= 1, got 0"),
    ({"train": {"grad_accum_steps": 0}}, r"train.grad_accum_steps must be positive \(1 runs the batch at once\), got 0$"),
    ({"train": {"grad_accum_steps": 129}}, r"train.grad_accum_steps 129 is more micro-batches than the 128 images of "
                                           r"a batch \(train.batch_size\); set it at most 128$"),
    ({"train": {"grad_accum_steps": 4, "batch_size": 4}, "model": {"stem": "conv", "patch_size": 32}},
     "leaves one image of one patch in a micro-batch: the conv stem's BatchNorm needs more than one value"),
    ({"data": {"dataset": "imagenet21k"}}, "data.dataset must be one of"),
    ({"train": {"precision": "fp8"}}, "train.precision must be one of"),
    # the choices once, and a near miss suggested (the choices were listed twice, a second time after "; choices:")
    ({"train": {"compile_mode": "turbo"}}, r"max-autotune-no-cudagraphs, got 'turbo'$"),
    ({"train": {"compile_mode": "reduce_overhead"}}, r"got 'reduce_overhead'; did you mean 'reduce-overhead'\?$"),
    # an empty value (`key:` in YAML, `--set key=`): said so, and a choice key lists its choices (it said
    # "expected str, got None")
    ({"train": {"compile_mode": None}}, r"compile_mode must be one of auto, .*, got no value \(empty or null\)$"),
    ({"model": {"stem": 5}}, r"model.stem must be one of linear, conv, got 5$"),
    ({"train": {"epochs": None}}, r"train.epochs: expected a whole number, got no value \(empty or null\)$"),
    ({"train": {"lr": None}}, r"train.lr: expected a number, got no value"),
    ({"train": {"device": None}}, r"train.device: expected text, got no value"),
    ({"model": {"stem": "conv", "patch_size": 6}, "data": {"image_size": 36}}, "power-of-two patch_size"),
    ({"model": {"stem": "conv", "stem_channels": [16]}}, "model.stem_channels needs one positive width"),
    ({"model": {"patch_size": 0}}, "model.patch_size must be positive, got 0"),  # not a ZeroDivisionError
    ({"model": {"patch_size": -4}}, "model.patch_size must be positive, got -4"),
    ({"model": {"heads": 0}}, "model.dim/depth/heads must be positive"),
    ({"data": {"image_size": 0}}, "data.image_size must be positive, got 0"),  # not the dataset's default
    ({"data": {"dataset": "cifar10", "mean": [], "std": []}}, "needs one value per channel"),
    # on the 0-255 scale: every image normalised to about -2, silently (the scale is pixel values / 255)
    ({"data": {"mean": [125.3, 123.0, 113.9]}}, r"data.mean is on the 0-1 scale .*, got \[125.3, 123.0, 113.9\]: "
                                                r"divide by 255$"),
    ({"data": {"std": [63.0, 62.1, 66.7]}}, "data.std is on the 0-1 scale"),
    ({"data": {"mean": [-0.1, 0.5, 0.5]}}, r"data.mean must be >= 0 \(a pixel's mean on the 0-1 scale\)"),
    # data.std left at the dataset's default: the message names the key that was given (it said "the same length")
    ({"data": {"dataset": "fashion_mnist", "mean": [0.5, 0.5, 0.5]}},
     "data.mean needs one value per channel: fashion_mnist images have 1, got 3"),
    ({"data": {"dataset": "mnist"}, "train": {"eval_hflip": True}}, "train.eval_hflip .* needs data.hflip: true"),
    ({"data": {"hflip": False}, "train": {"eval_hflip": True}}, "train.eval_hflip .* needs data.hflip: true"),
    ({"train": {"min_lr": -0.001}}, "train.min_lr must be >= 0"),  # the schedule would end below 0
    # above lr, the "decay" climbed to it (min_lr 1: the rate rose to ~1 and the run diverged without a word)
    ({"train": {"lr": 0.003, "min_lr": 1}}, "train.min_lr 1 is above train.lr 0.003: the cosine schedule would raise"),
    # a crop from an image padded by more than its size may hold none of it (100000 ran out of memory in the step)
    ({"data": {"crop_padding": 32}}, "data.crop_padding 32 must be less than the 32x32 images it pads"),
    # CIFAR upsampled to 64: the crop is cut at 32 (40 was accepted, and 204 of 500 crops held no image pixel)
    ({"data": {"crop_padding": 40, "image_size": 64}}, r"40 must be less than the 32x32 images it pads \(the crop is "
                                                       r"cut before the resize to data.image_size"),
    # keys that YAML reads as numbers, booleans or null (1:, true:, null:): one line, not difflib's TypeError
    ({"train": {1: 2}}, "a key in section 'train' must be text, got 1; valid keys: batch_size"),
    ({True: 1}, r"a section name must be text \(data, model, train or name\), got True"),
    # text that YAML reads as something else in a file: quote it
    ({"data": {"root": 123}}, r"data.root: expected text, got 123; put it in quotes$"),
    ({"name": datetime.date(2024, 1, 1)}, r"got datetime.date\(2024, 1, 1\); put it in quotes$"),
    ({"train": {"weight_decay": -5}}, "train.weight_decay must be >= 0, got -5"),
    ({"train": {"device": "gpu"}}, "train.device must be auto, cpu, cuda, cuda:N or mps"),
    ({"train": {"device": "cuda:abc"}}, "train.device must be auto, cpu, cuda, cuda:N or mps"),
    ({"data": {"crop_padding": -1}}, "data.crop_padding must be >= 0, got -1"),  # was random_'s traceback
    ({"train": {"seed": 10**14}}, r"train.seed must be in \[0, 2\^32\)"),  # overflowed the epoch order's seed
    ({"train": {"seed": -1}}, r"train.seed must be in \[0, 2\^32\)"),
    # infinite or NaN floats: mixup/cutmix alpha inf hung the Beta draw, warmup/mlp_ratio inf overflowed
    ({"data": {"cutmix_alpha": float("inf")}}, "data.cutmix_alpha: expected a finite number, got inf"),
    ({"data": {"mixup_alpha": "inf"}}, "data.mixup_alpha: expected a finite number, got inf"),
    ({"train": {"warmup_epochs": float("inf")}}, "train.warmup_epochs: expected a finite number"),
    ({"model": {"mlp_ratio": "inf"}}, "model.mlp_ratio: expected a finite number"),
    ({"train": {"lr": float("nan")}}, "train.lr: expected a finite number, got nan"),
    ({"model": {"mlp_ratio": 0.001}}, "model.mlp_ratio must give the MLP at least one unit"),  # was a 0-wide MLP
    ({"model": {"stem": "conv", "patch_size": 32}, "train": {"batch_size": 1}},  # was BatchNorm's traceback
     "train.batch_size 1 with one patch per image"),
])
def test_invalid_configs_name_the_key(raw, message):
    with pytest.raises(VitError, match=message):
        build_config(raw, source="my.yaml")


def test_an_empty_recipe_is_refused_not_read_as_all_defaults(tmp_path):
    """`vit train -c my.yaml --set ... --print-config > my.yaml`: the shell empties my.yaml before vit reads it,
    and the run went on as the defaults (cifar10, name vit) with exit 0."""
    for text in ("", "# the recipe for table 2\n\n"):
        recipe = tmp_path / "my.yaml"
        recipe.write_text(text)
        with pytest.raises(VitError, match=r"my.yaml is empty \(no settings, or only comments\); start from a "
                                           r"recipe in configs/ \(a shell redirection to the file vit reads"):
            load_config(recipe, ["train.epochs=5"])
    recipe.write_text("data:\n  dataset: synthetic\n")
    assert load_config(recipe).data.dataset == "synthetic"


def test_keys_nothing_reads_get_a_note():
    assert "has no effect without train.compile: true" in unread_keys_note(
        build_config({"train": {"compile_mode": "reduce-overhead"}}))
    assert unread_keys_note(build_config({"train": {"compile_mode": "reduce-overhead", "compile": True}})) is None
    assert unread_keys_note(build_config({})) is None  # auto: nothing was asked for
    # the conv stem's widths with the linear stem (it was silently ignored)
    note = unread_keys_note(build_config({"model": {"stem": "linear", "stem_channels": [16, 32]}}))
    assert note == ("vit: note: model.stem_channels [16, 32] has no effect with model.stem: linear (they are the "
                    "conv stem's widths)")
    assert unread_keys_note(build_config({"model": {"stem": "conv", "stem_channels": [16, 32]}})) is None


def test_set_errors():
    with pytest.raises(VitError, match="section.key=value"):
        build_config({}, ["epochs"])
    with pytest.raises(VitError, match="did you mean 'train.epochs'"):
        build_config({}, ["train.epoch=3"])
    # several --set typos are one error, as a file's are (each was its own run)
    with pytest.raises(VitError, match=r"^--set train.epoch=3, --set model.dpeth=2: unknown keys 'train.epoch' \(did "
                                       r"you mean 'train.epochs'\?\), 'model.dpeth' \(did you mean 'model.depth'\?\);"):
        build_config({}, ["train.epoch=3", "train.lr=0.1", "model.dpeth=2"])
    with pytest.raises(VitError, match=r"^--set train.epochs=: train.epochs: expected a whole number, got no value"):
        build_config({}, ["train.epochs="])
    with pytest.raises(VitError, match=r"^--set data.root=: data.root: expected text, got no value"):
        build_config({}, ["data.root="])


def test_set_gives_text_keys_the_text_as_typed():
    """YAML reads ~ as null, 2024-01-01 as a date, no as false and 123 as a number; for a text key, --set means the
    text (data.root=~ is the home folder, as the README says). A key that may be null stays null with ~."""
    config = build_config({}, ["data.root=~", "name=2024-01-01", "train.device=cpu"])
    assert config.data.root == "~" and config.data_root == Path.home() and config.name == "2024-01-01"
    assert build_config({}, ["name=no", "data.root=123"]).data.root == "123"
    assert build_config({}, ["name=no"]).name == "no"
    assert build_config({"model": {"init_from": "a.pt"}}, ["model.init_from=~"]).model.init_from is None
    assert build_config({}, ["train.epochs=7"]).train.epochs == 7  # numbers for number keys, as before


def test_errors_name_the_set_that_gave_the_value():
    """A value from --set is named as such, not as if the YAML file held it."""
    with pytest.raises(VitError, match=r"^--set model.heads=5: model.heads dim 32 is not divisible by heads 5"):
        build_config({"model": {"dim": 32}}, ["model.heads=5"], source="my.yaml")
    with pytest.raises(VitError, match=r"^--set model.dim=30: model.heads dim 30"):
        build_config({"model": {"heads": 4}}, ["model.dim=30"], source="my.yaml")
    with pytest.raises(VitError, match=r"^my.yaml: model.heads dim 30"):  # both from the file
        build_config({"model": {"heads": 4, "dim": 30}}, ["train.epochs=2"], source="my.yaml")
    with pytest.raises(VitError, match=r"^--set name=a/b: 'name' \(runs/NAME/...\) must be"):
        build_config({}, ["name=a/b"], source="my.yaml")
    with pytest.raises(VitError, match=r"^--set name=a+: 'name' \(runs/NAME/...\) is 300 bytes long"):
        build_config({}, ["name=" + "a" * 300], source="my.yaml")  # (was "File name too long" after runs/ was made)
    for parent in (".", ".."):  # runs/.. is the current folder: the run would land outside runs/
        with pytest.raises(VitError, match=r"other than '\.' and '\.\.', got '\.{1,2}'"):
            build_config({}, [f"name={parent}"], source="my.yaml")


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  dim: 64\n  heads: [4\n")
    with pytest.raises(VitError, match=r"bad.yaml: YAML syntax error at line \d+"):
        load_config(path)
    # text in another encoding (PowerShell's > writes UTF-16): said to be saved as UTF-8
    path.write_text("model:\n  dim: 64\n", encoding="utf-16")
    with pytest.raises(VitError, match=r"bad.yaml is not a YAML text file .* or save the file as UTF-8$"):
        load_config(path)
    # nesting deeper than the parser's recursion: one line, not a RecursionError
    path.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(VitError, match=r"bad.yaml: nested too deeply to read"):
        load_config(path)


def test_print_config_round_trips(tmp_path):
    result = run_vit("train", "--config", REPO / "configs" / "smoke.yaml", "--set", "train.epochs=9",
                     "--print-config", check=True)
    printed = yaml.safe_load(result.stdout)
    assert printed["train"]["epochs"] == 9
    (tmp_path / "again.yaml").write_text(result.stdout)
    again = run_vit("train", "--config", tmp_path / "again.yaml", "--print-config", check=True)
    assert again.stdout == result.stdout


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_are_valid_and_documented(name):
    path = REPO / "configs" / name
    text = path.read_text()
    assert text.startswith("#"), "each config starts with a comment: the command and its accuracy"
    assert f"vit train --config configs/{name}" in text and "Measured:" in text
    load_config(path)


def test_a_key_given_twice_in_the_yaml_file_is_refused(tmp_path):
    """The last of the two silently won."""
    path = tmp_path / "twice.yaml"
    path.write_text("data:\n  dataset: synthetic\n  image_size: 32\n  dataset: cifar10\n")
    with pytest.raises(VitError, match=r"twice.yaml: 'dataset' is given twice \(lines 2 and 4\); keep one$"):
        load_config(path)
    path.write_text("model:\n  dim: 64\ntrain:\n  epochs: 2\nmodel:\n  depth: 2\n")
    with pytest.raises(VitError, match=r"'model' is given twice \(lines 1 and 5\)"):
        load_config(path)
    path.write_text("base: &b\n  epochs: 3\ntrain:\n  <<: *b\n  lr: 0.01\n")  # a YAML merge key is no repeat
    with pytest.raises(VitError, match="unknown section 'base'"):  # read as yaml.safe_load reads it
        load_config(path)
    path.write_text("data:\n  mean: &m [0.5, 0.5, 0.5]\n  std: *m\ntrain:\n  <<: {epochs: 3}\n")
    config = load_config(path)
    assert config.train.epochs == 3 and config.data.std == [0.5, 0.5, 0.5]


def test_a_saved_config_is_read_as_it_was_trained():
    """A checkpoint's config from before the 0-1 check on data.mean / std still opens (its model was trained
    with those values); a new config with them is refused."""
    from vitcli.config import config_from_dict

    raw = {"data": {"mean": [125.3, 123.0, 113.9], "std": [63.0, 62.1, 66.7]}}
    assert config_from_dict(raw).data.mean == [125.3, 123.0, 113.9]
    with pytest.raises(VitError, match="data.mean is on the 0-1 scale"):
        build_config(raw)
