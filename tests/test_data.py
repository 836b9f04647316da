import random
from pathlib import Path

import pytest
import torch

from vitcli.config import build_config
from vitcli.data import (TrainBatches, _StepSampler, epoch_permutation, load_array_dataset, mix, random_crop,
                         random_erasing)
from vitcli.errors import VitError


def test_random_crop_is_a_window_of_the_padded_image():
    images = torch.randint(0, 255, (6, 3, 8, 8), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    out = random_crop(images, 2, g)
    padded = torch.nn.functional.pad(images, (2,) * 4)
    for i in range(6):
        assert any(torch.equal(out[i], padded[i, :, y:y + 8, x:x + 8]) for y in range(5) for x in range(5))


def test_random_erasing_changes_only_a_rectangle():
    x = torch.zeros(64, 1, 16, 16)
    out = random_erasing(x, 1.0, torch.Generator().manual_seed(0))
    changed = out != 0
    assert changed.any(dim=(1, 2, 3)).float().mean() > 0.9
    for i in range(64):
        rows, cols = changed[i, 0].any(1).nonzero(), changed[i, 0].any(0).nonzero()
        if len(rows):
            area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            assert area <= 0.4 * 256
            assert changed[i, 0].sum() == area  # the bounding box is filled: a rectangle, nothing outside it


def test_mixup_targets_weigh_the_labels_as_the_images_are_mixed():
    x = torch.randn(8, 1, 8, 8)
    labels = torch.arange(8) % 3
    one_hot = torch.nn.functional.one_hot(labels, 3).float()
    for seed in range(5):
        mixed, targets = mix(x, labels, 3, 0.8, 0.0, random.Random(seed))  # MixUp only
        lam = float(((mixed - x.flip(0)) / (x - x.flip(0))).median())  # x*lam + partner*(1-lam), solved for lam
        assert 0 < lam < 1
        torch.testing.assert_close(mixed, x * lam + x.flip(0) * (1 - lam))
        torch.testing.assert_close(targets, one_hot * lam + one_hot.flip(0) * (1 - lam))


def test_cutmix_targets_weigh_the_labels_by_the_pasted_area():
    x = torch.randn(8, 1, 16, 16)
    labels = torch.arange(8) % 3
    one_hot = torch.nn.functional.one_hot(labels, 3).float()
    pasted_some = False
    for seed in range(10):
        mixed, targets = mix(x, labels, 3, 0.0, 1.0, random.Random(seed))  # CutMix only
        from_partner = (mixed != x)[0, 0]  # the pasted box, the same in every image
        assert torch.equal(mixed[:, :, from_partner], x.flip(0)[:, :, from_partner])
        lam = 1 - from_partner.float().mean().item()  # the share of each image's own pixels
        pasted_some |= lam < 1
        torch.testing.assert_close(targets, one_hot * lam + one_hot.flip(0) * (1 - lam))
    assert pasted_some


def test_epoch_order_covers_every_image_and_shards_by_rank():
    config = build_config({"data": {"dataset": "synthetic", "image_size": 8, "max_train_samples": 100},
                           "model": {"patch_size": 4, "dim": 8, "heads": 2}, "train": {"batch_size": 10}})
    single = TrainBatches(config, torch.device("cpu"))
    ranks = [TrainBatches(config, torch.device("cpu"), rank=r, world_size=2) for r in range(2)]
    steps = list(single.epoch(3))
    sharded = [list(r.epoch(3)) for r in ranks]
    assert len(steps) == 10
    for step, (images, labels) in enumerate(steps):  # the two ranks' shards make up each batch
        assert torch.equal(torch.cat([sharded[0][step][1], sharded[1][step][1]]), labels)
        assert torch.equal(torch.cat([sharded[0][step][0], sharded[1][step][0]]), images)
    # resuming at step 4 yields exactly the remaining batches
    resumed = list(single.epoch(3, start_step=4))
    assert len(resumed) == 6
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(resumed, steps[4:]))
    # every image once per epoch, in the epoch's permutation
    order = epoch_permutation(100, config.train.seed, 3)
    assert torch.equal(torch.cat([images for images, _ in steps]), single.data.images[order])
    assert not torch.equal(epoch_permutation(100, 0, 3), epoch_permutation(100, 0, 4))


def test_step_sampler_matches_in_memory_order():
    sampler = _StepSampler(100, 10, seed=0, rank=1, world_size=2)
    sampler.epoch, sampler.start_step = 2, 3
    indices = list(sampler)
    order = epoch_permutation(100, 0, 2)
    assert indices[:5] == order[35:40].tolist()
    assert len(indices) == len(sampler) == 7 * 5


def test_batch_size_must_divide_over_ranks():
    config = build_config({"data": {"dataset": "synthetic", "image_size": 8}, "model": {"patch_size": 4},
                           "train": {"batch_size": 9}})
    with pytest.raises(VitError, match="does not divide over 2 processes"):
        TrainBatches(config, torch.device("cpu"), rank=0, world_size=2)


def test_idx_reader_plain_and_gzip(tmp_path):
    from conftest import class_images, write_idx

    images, labels = class_images(20, 1, 28, 0)
    write_idx(tmp_path / "plain", "train", images, labels, gz=False)
    write_idx(tmp_path / "gz", "train", images, labels, gz=True)
    for folder in ("plain", "gz"):
        config = build_config({"data": {"dataset": "mnist", "root": str(tmp_path / folder)}})
        data = load_array_dataset(config, "train")
        assert data.images.shape == (20, 1, 28, 28) and data.images.dtype == torch.uint8
        assert torch.equal(data.images[:, 0], torch.from_numpy(images[..., 0]))
        assert data.labels.tolist() == labels.tolist()


def test_a_damaged_gzip_idx_file_is_one_error(tmp_path):
    """A corrupted download: zlib's own error becomes the 'download it again' line."""
    from conftest import class_images, write_idx

    images, labels = class_images(200, 1, 28, 0)
    write_idx(tmp_path, "train", images, labels)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    raw = bytearray(path.read_bytes())
    raw[60:160] = bytes(255 - b for b in raw[60:160])
    path.write_bytes(bytes(raw))
    config = build_config({"data": {"dataset": "mnist", "root": str(tmp_path)}})
    with pytest.raises(VitError, match="unreadable idx file .* download it again"):
        load_array_dataset(config, "train")


def test_swapped_or_mismatched_idx_files_say_which(tmp_path):
    import shutil

    from conftest import class_images, write_idx

    images, labels = class_images(20, 1, 28, 0)
    write_idx(tmp_path, "train", images, labels)
    config = build_config({"data": {"dataset": "mnist", "root": str(tmp_path)}})
    shutil.copy(tmp_path / "train-labels-idx1-ubyte.gz", tmp_path / "train-images-idx3-ubyte.gz")
    with pytest.raises(VitError, match=r"train-images-idx3-ubyte.gz: not an idx file of images .* a labels file"):
        load_array_dataset(config, "train")
    write_idx(tmp_path, "train", images, labels[:10])
    with pytest.raises(VitError, match=r"train-labels-idx1-ubyte.gz: labels \(10,\) do not match the 20 images"):
        load_array_dataset(config, "train")


def test_missing_dataset_names_folder_and_fix(tmp_path):
    config = build_config({"data": {"dataset": "fashion_mnist", "root": str(tmp_path / "nothing")}})
    with pytest.raises(VitError, match=r"fashion_mnist not found in .*nothing.*dataset-fashion-mnist"):
        load_array_dataset(config, "train")


def test_mnist_and_fashion_mnist_never_read_each_others_files(tmp_path):
    """They share file names; torchvision downloads each into its own folder under the same root."""
    from conftest import class_images, write_idx

    images, labels = class_images(20, 1, 28, 0)
    write_idx(tmp_path / "FashionMNIST" / "raw", "train", images, labels)
    fashion = build_config({"data": {"dataset": "fashion_mnist", "root": str(tmp_path)}})
    assert len(load_array_dataset(fashion, "train").labels) == 20
    digits = build_config({"data": {"dataset": "mnist", "root": str(tmp_path)}})
    with pytest.raises(VitError, match="mnist not found"):
        load_array_dataset(digits, "train")


def test_image_folder_subsets_draw_from_every_class(imagefolder_dir):
    """ImageFolder lists class by class: the first N would be one class. A seeded sample is taken instead."""
    from vitcli.data import make_imagefolder

    config = build_config({"data": {"dataset": "imagefolder", "root": str(imagefolder_dir), "image_size": 32,
                                    "max_val_samples": 9}})
    dataset = make_imagefolder(config, "val", train=False)
    assert len(dataset.samples) == 9 and set(dataset.targets) == {0, 1, 2}
    assert [target for _, target in dataset.samples] == dataset.targets
    assert dataset.samples == make_imagefolder(config, "val", train=False).samples  # the same subset each time
    # the train split evaluated (vit eval --split train) keeps its own limit, not the test split's
    assert len(make_imagefolder(config, "train", train=False).samples) == 72


def test_evaluation_batches_take_another_size_and_never_exceed_the_split(imagefolder_dir):
    """eval_batches' factory runs at a smaller size (a retry after running out of memory; image folders get a
    DataLoader of that size) and cuts a size larger than the split to it, for image folders and in-memory data:
    the same images, in the same order, whatever the size."""
    from vitcli.data import eval_batches

    cpu = torch.device("cpu")
    folder = build_config({"data": {"dataset": "imagefolder", "root": str(imagefolder_dir), "image_size": 32,
                                    "num_workers": 0}})
    memory = build_config({"data": {"dataset": "synthetic", "image_size": 16, "max_val_samples": 20}})
    for config, n in ((folder, 24), (memory, 20)):
        _, count, batches, whole = eval_batches(config, "val" if config is folder else "test", cpu, 8)
        assert count == n and whole == (None if config is folder else 512)  # (synthetic's test split: 512)
        sizes = {size: [len(labels) for _, labels in batches(size)] for size in (None, 5, 2**66)}
        assert sizes[None] == [8] * (n // 8) + ([n % 8] if n % 8 else [])
        assert sizes[5] == [5] * (n // 5) + ([n % 5] if n % 5 else []) and sizes[2**66] == [n]
        first = torch.cat([images for images, _ in batches(5)])
        assert torch.equal(first, torch.cat([images for images, _ in batches(2**66)]))
    # a limit no smaller than the split leaves it whole (vit eval said "limited by data.max_val_samples" at 512)
    for limit, whole in ((512, None), (511, 512)):
        config = build_config({"data": {"dataset": "synthetic", "image_size": 16, "max_val_samples": limit}})
        assert eval_batches(config, "test", cpu, 8).whole == whole
    for limit, whole in ((24, None), (23, 24)):
        config = build_config({"data": {"dataset": "imagefolder", "root": str(imagefolder_dir), "image_size": 32,
                                        "num_workers": 0, "max_val_samples": limit}})
        assert eval_batches(config, "val", cpu, 8).whole == whole


def test_predict_sees_an_image_folder_image_as_eval_does(imagefolder_dir):
    """`vit predict` and `vit eval` resize and crop an image folder's image the same way, to the same pixels, so
    an image scores the same in both; shapes whose rounding differs included (wide, tall, odd, gray, JPEG)."""
    import numpy as np
    from PIL import Image

    from vitcli.data import make_imagefolder
    from vitcli.predict import image_to_tensor, open_image, view_box

    rng = np.random.default_rng(1)
    for i, (w, h) in enumerate([(301, 97), (97, 301), (65, 64), (50, 200), (37, 37)]):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).convert("L" if i % 2 else "RGB")
        image.save(imagefolder_dir / "val" / "stripe" / f"odd{i}.{'jpg' if i == 2 else 'png'}")
    config = build_config({"data": {"dataset": "imagefolder", "root": str(imagefolder_dir), "image_size": 32},
                           "model": {"patch_size": 4}})
    dataset = make_imagefolder(config, "val", train=False)
    assert len(dataset) == 24 + 5
    for (path, _), (seen_by_eval, _) in zip(dataset.samples, dataset):
        original = open_image(path)
        assert torch.equal(image_to_tensor(original, config), seen_by_eval), path
        left, top, right, bottom = view_box(config, *original.size)  # the crop, in the original's pixels
        assert 0 <= left < right <= original.size[0] and 0 <= top < bottom <= original.size[1], path
        assert right - left == pytest.approx(bottom - top, rel=0.05), path


def test_a_missing_image_folder_says_which_key_to_set(tmp_path):
    """vit train (a resumed run's relative data.root read from another folder) is told data.root; vit eval, which
    takes no config key, uses the message without that advice and names its --data-root instead."""
    from vitcli.data import imagefolder_classes
    from vitcli.errors import DatasetNotFound

    with pytest.raises(DatasetNotFound) as caught:
        imagefolder_classes(tmp_path / "pics", "train")
    assert str(caught.value).endswith("; set data.root to the folder holding them (--set data.root=DIR; a relative "
                                      "one is read from where vit runs)")
    assert caught.value.what == (f"image folder {tmp_path / 'pics' / 'train'} not found: an imagefolder dataset "
                                 f"needs {tmp_path / 'pics'}/train/<class>/* and {tmp_path / 'pics'}/val/<class>/*")


def test_an_image_folder_dataset_skips_hidden_entries_and_pickles(imagefolder_dir):
    """Hidden class folders and hidden files (also in a hidden subfolder of a class) are not data; the dataset is a
    module-level class, which DataLoader workers started by spawn (macOS, Python 3.14's forkserver) can unpickle
    (a subclass made inside the function could not be pickled)."""
    import pickle

    from conftest import write_png
    from vitcli.data import make_imagefolder

    (imagefolder_dir / "train" / ".ipynb_checkpoints").mkdir()
    write_png(imagefolder_dir / "train" / ".ipynb_checkpoints" / "0.png", size=32, mode="RGB")
    (imagefolder_dir / "train" / "circle" / ".thumbs").mkdir()
    (imagefolder_dir / "train" / "circle" / ".thumbs" / "0.png").write_bytes(b"not a png")
    (imagefolder_dir / "train" / "square" / "._0.png").write_bytes(b"AppleDouble")
    config = build_config({"data": {"dataset": "imagefolder", "root": str(imagefolder_dir), "image_size": 32},
                           "model": {"patch_size": 8}})
    dataset = make_imagefolder(config, "train", train=True)
    assert dataset.classes == ["circle", "square", "stripe"] and len(dataset) == 72
    assert sorted(set(dataset.targets)) == [0, 1, 2] and dataset.targets.count(0) == 24
    assert all("/." not in path for path, _ in dataset.samples)
    again = pickle.loads(pickle.dumps(dataset))
    assert again.samples == dataset.samples and again[0][0].shape == (3, 32, 32)


def test_image_folder_links_are_followed_once_and_other_types_noted(imagefolder_dir, capsys):
    """A link inside a class folder to its parent made torchvision's ImageFolder list every other class's images
    under that class (2952 samples for 72, most mislabelled), and two such links never finished listing; links to
    the dataset's root or to another split are not followed either; a symlinked subfolder elsewhere is still read. Pictures PIL could open under a suffix not read (.jfif) are noted:
    a class was left with 2 images without a word."""
    import shutil

    from conftest import write_png
    from vitcli.data import make_imagefolder

    train = imagefolder_dir / "train"
    (train / "circle" / "up").symlink_to("..")
    (train / "square" / "more").symlink_to(train / "circle")
    extra = imagefolder_dir.parent / "extra"
    extra.mkdir()
    write_png(extra / "e.png", size=32, mode="RGB")
    (train / "stripe" / "linked").symlink_to(extra)
    (train / "stripe" / "root").symlink_to("../..")  # the dataset itself: val/ and test/ would leak in
    (train / "stripe" / "val").symlink_to(imagefolder_dir / "val" / "stripe")
    for i in range(3):
        shutil.move(train / "stripe" / f"{i}.png", train / "stripe" / f"{i}.jfif")
    (train / "stripe" / "notes.txt").write_text("not a picture, not noted")
    config = build_config({"data": {"dataset": "imagefolder", "root": str(imagefolder_dir), "image_size": 32},
                           "model": {"patch_size": 8}})
    dataset = make_imagefolder(config, "train", train=False)
    assert [dataset.targets.count(i) for i in range(3)] == [24, 24, 24 - 3 + 1]
    assert all(Path(path).parent.name == dataset.classes[target] or Path(path).name == "e.png"
               for path, target in dataset.samples)
    assert f"vit: note: {train}: 3 .jfif files not read (the image types read: .png, " in capsys.readouterr().err
    # a class folder that is a link to another: its images would be two classes at once
    (train / "kitty").symlink_to(train / "circle")
    with pytest.raises(VitError, match=f"{train / 'kitty'} and {train / 'circle'} are the same folder"):
        make_imagefolder(config, "train", train=False)


def test_an_image_folders_test_split_is_its_test_folder_of_classes(tmp_path):
    """vit eval's default split: test/ where it holds class folders (val/ picked best.pt); a Kaggle-style test/ of
    unlabelled images is not read; training asks for val. In-memory datasets have one held-out split."""
    from vitcli.data import split_name
    from vitcli.evaluate import check_same_classes

    (tmp_path / "val" / "cat").mkdir(parents=True)
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "0001.jpg").write_bytes(b"unlabelled")
    assert split_name("test", "imagefolder", tmp_path) == "val"
    (tmp_path / "test" / ".cache").mkdir()
    assert split_name("test", "imagefolder", tmp_path) == "val"
    (tmp_path / "test" / "cat").mkdir()
    assert split_name("test", "imagefolder", tmp_path) == "test"
    assert split_name("val", "imagefolder", tmp_path) == "val"
    assert split_name("val", "cifar10", tmp_path) == split_name("test", "cifar10", tmp_path) == "test"
    config = build_config({"data": {"dataset": "imagefolder", "root": str(tmp_path)}})
    with pytest.raises(VitError, match=r"\(--data-root DIR: the folder of that dataset\) or --split val \(its test/ "
                                       r"folder was read\)$"):
        check_same_classes(["cat"], ["cat", "dog"], config, "test")
    check_same_classes(["cat", "dog"], ["cat", "dog"], config, "test")


def test_an_image_folder_of_one_class_is_refused(tmp_path):
    """One class trained to "top-1 1.0000", which says nothing about the model."""
    from vitcli.data import imagefolder_classes

    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(VitError, match=r"train holds one class folder \(cat\); a classifier needs two or more"):
        imagefolder_classes(tmp_path, "train")
    (tmp_path / "train" / "dog").mkdir()
    assert imagefolder_classes(tmp_path, "train") == ["cat", "dog"]


def test_labels_outside_the_classes_are_one_line(tmp_path, cifar10_dir):
    """EMNIST letters (labels 1-26) under MNIST's name, or a CIFAR batches.meta naming fewer classes than the
    labels use, stopped the first step with the loss's IndexError traceback (a device-side assert on CUDA)."""
    import pickle

    import numpy as np

    from conftest import class_images, write_idx

    images, _ = class_images(64, 1, 28, seed=0)
    write_idx(tmp_path / "letters", "train", images, np.arange(64) % 26 + 1)
    config = build_config({"data": {"dataset": "mnist", "root": str(tmp_path / "letters")}})
    with pytest.raises(VitError, match=r"train-labels-idx1-ubyte.gz: labels run from 1 to 26, but the dataset has 10 "
                                       r"classes \(0 to 9\); the idx files of MNIST and Fashion-MNIST hold 10"):
        load_array_dataset(config, "train")
    meta = cifar10_dir / "cifar-10-batches-py" / "batches.meta"
    meta.write_bytes(pickle.dumps({"label_names": ["airplane", "automobile", "bird"]}))
    config = build_config({"data": {"dataset": "cifar10", "root": str(cifar10_dir)}})
    with pytest.raises(VitError, match=r"test_batch: labels run from 0 to 9, but the dataset has 3 classes .*its "
                                       r"batches.meta names 3"):
        load_array_dataset(config, "test")


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="Debian's dataset-fashion-mnist")
def test_fashion_mnist_files_read_as_mnist_get_a_note(capsys):
    """MNIST and Fashion-MNIST ship under the same four file names: the wrong data.dataset trained silently with the
    other's class names, normalization and flips. The pixel mean tells them apart (0.286 against 0.131)."""
    root = "/usr/share/datasets/fashion-mnist"
    load_array_dataset(build_config({"data": {"dataset": "fashion_mnist", "root": root}}), "train")
    assert capsys.readouterr().err == ""
    load_array_dataset(build_config({"data": {"dataset": "mnist", "root": root}}), "train")
    assert (f"vit: note: the images in {root} have a mean of 0.286, fashion_mnist's (0.286) rather than mnist's "
            f"(0.1307): are they fashion_mnist? If so, set data.dataset=fashion_mnist") in capsys.readouterr().err
