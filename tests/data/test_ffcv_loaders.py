"""data.loader=ffcv: batches read back from .beton files written by `kdflow data prepare`."""
from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch

from datafiles import write_fake_cifar100, write_jpeg_tree
from kdflow.orchestrator.data import Batch, build_data, validate_dataset
from kdflow.orchestrator.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD
from kdflow.orchestrator.data.prepare import image_settings, prepare

CPU = torch.device("cpu")
FIELD = "study.datasets.imagefolder"
#: 64 x 64 sources and 56-pixel crops: the val transforms (Resize(64) + CenterCrop(56), and
#: FFCV's centre crop of 56/64 = 224/256 of the side) then only crop, never resample.
SIDE, CROP = 64, 56


def _prepare(root: Path, dataset: str, **image) -> None:
    cfg = validate_dataset(dataset, {"root": str(root)}, "d")
    prepare(dataset, cfg, image_settings(dataset, image), workers=2, say=lambda _: None)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A 3-class JPEG tree (8 train, 4 val images a class) prepared as raw and as JPEG betons."""
    root = tmp_path_factory.mktemp("tree")
    write_jpeg_tree(root, {"train": 8, "val": 4}, classes=("a", "b", "c"), size=(SIDE, SIDE),
                    smooth=True)
    _prepare(root, "imagefolder", write_mode="raw")
    cfg = validate_dataset("imagefolder", {"root": str(root), "beton_dir": str(root / "jpg")}, "d")
    prepare("imagefolder", cfg, image_settings("imagefolder", {"write_mode": "jpg"}), workers=2,
            say=lambda _: None)
    return root


def _data(root: Path, loader: str = "ffcv", batch_size: int = 5, seed: int = 0,
          channels_last: bool = False, **settings):
    values = {"root": str(root), "loader": loader, "image_size": CROP, "workers": 0, **settings}
    return build_data("imagefolder", values, FIELD, batch_size, seed, CPU, channels_last)


def _pixels(batch: Batch) -> torch.Tensor:
    """Normalised ImageNet batch back to [0, 1] pixels."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return batch.x * std + mean


def _same(a: List[Batch], b: List[Batch]) -> bool:
    return len(a) == len(b) and all(torch.equal(x.x, y.x) and torch.equal(x.y, y.y)
                                    and torch.equal(x.index, y.index) for x, y in zip(a, b))


def test_raw_beton_gives_back_the_images_and_labels_torchvision_reads(tree: Path) -> None:
    ffcv, reference = _data(tree), _data(tree, loader="torchvision")
    assert ffcv.info.num_classes == 3 and ffcv.info.num_samples == 24
    assert torch.equal(ffcv.info.labels, reference.info.labels)
    mine, theirs = list(ffcv.val.batches()), list(reference.val.batches())
    assert [b.x.shape for b in mine] == [b.x.shape for b in theirs] == [(5, 3, CROP, CROP)] * 2 \
        + [(2, 3, CROP, CROP)]
    for a, b in zip(mine, theirs):
        assert torch.equal(a.y, b.y) and torch.equal(a.index, b.index)
        assert torch.allclose(a.x, b.x, atol=1e-5)  # the same pixels, normalised


def test_jpeg_beton_is_within_jpeg_tolerance(tree: Path) -> None:
    ffcv = _data(tree, beton_dir=str(tree / "jpg"))
    reference = _data(tree, loader="torchvision")
    for a, b in zip(ffcv.val.batches(), reference.val.batches()):
        assert torch.equal(a.y, b.y)
        error = (_pixels(a) - _pixels(b)).abs()
        assert error.mean() < 2 / 255 and error.max() < 48 / 255, (error.mean(), error.max())
        assert not torch.equal(a.x, b.x)  # it really went through a JPEG round trip


def test_training_batches_are_seeded_resumable_and_sharded(tree: Path) -> None:
    data = _data(tree)
    epoch = list(data.train.batches(3))
    assert data.train.steps_per_epoch == 5 and [len(b.y) for b in epoch] == [5, 5, 5, 5, 4]
    assert sorted(torch.cat([b.index for b in epoch]).tolist()) == list(range(24))
    for batch in epoch:
        assert torch.equal(batch.y, data.info.labels[batch.index])
        assert batch.x.shape[1:] == (3, CROP, CROP) and batch.x.is_contiguous()
    assert _same(list(data.train.batches(3, start_step=2)), epoch[2:])  # a resumed epoch
    assert list(data.train.batches(3, start_step=5)) == []
    assert _same(list(_data(tree, workers=2).train.batches(3)), epoch)  # threads change nothing
    other_epoch = list(data.train.batches(4))
    assert not torch.equal(other_epoch[0].index, epoch[0].index)
    other_seed = list(_data(tree, seed=1).train.batches(3))
    assert not torch.equal(other_seed[0].x, epoch[0].x)
    # each rank decodes its rows of every global batch: 3 + 2 rows, last batch 2 + 2
    shards = [list(data.train.batches(3, start_step=1, shard=(r, 2))) for r in range(2)]
    assert [len(b.y) for b in shards[0]] == [3, 3, 3, 2]
    assert [len(b.y) for b in shards[1]] == [2, 2, 2, 2]
    for whole, first, second in zip(epoch[1:], *shards):  # a sample's crop is its own
        assert torch.equal(torch.cat([first.index, second.index]), whole.index)
        assert torch.equal(torch.cat([first.y, second.y]), whole.y)
        assert torch.equal(torch.cat([first.x, second.x]), whole.x)
    val_shards = [list(data.val.batches(shard=(r, 2))) for r in range(2)]
    assert [torch.cat([b.index for b in s]).tolist() for s in val_shards] == [
        [0, 1, 2, 3, 4, 10, 11], [5, 6, 7, 8, 9]]


def test_random_resized_crop_boxes_follow_torchvisions_ranges() -> None:
    from kdflow.orchestrator.data.ffcv_ops import mix64, random_resized_crop

    scale, log_ratio = np.array([0.08, 1.0]), np.log(np.array([3 / 4, 4 / 3]))
    boxes = [random_resized_crop(300, 400, scale, log_ratio, np.uint64(mix64(np.uint64(k))))
             for k in range(2000)]
    assert len(set(boxes)) > 1900  # every key its own box
    for top, left, h, w in boxes:
        assert 0 <= top and top + h <= 300 and 0 <= left and left + w <= 400
        assert 0.08 * 0.95 <= h * w / 120000 <= 1.0
        assert 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05
    shares = np.array([h * w / 120000 for _, _, h, w in boxes])
    assert shares.min() < 0.15 and shares.max() > 0.9  # the whole range is drawn
    assert random_resized_crop(300, 400, scale, log_ratio,
                               np.uint64(mix64(np.uint64(7)))) == boxes[7]


def test_a_sample_gets_other_crops_in_other_epochs(tree: Path) -> None:
    data = _data(tree, batch_size=24)
    first, second = next(data.train.batches(0)), next(data.train.batches(1))
    order = second.index.argsort()
    assert torch.equal(first.index.sort().values, second.index[order])
    one = first.x[first.index.argsort()]
    assert all(not torch.equal(a, b) for a, b in zip(one, second.x[order]))


def test_channels_last_batches(tree: Path) -> None:
    data = _data(tree, channels_last=True)
    batch = next(data.train.batches(0))
    assert batch.x.is_contiguous(memory_format=torch.channels_last)
    plain = next(_data(tree).train.batches(0))
    assert torch.equal(batch.x, plain.x)  # same values, other layout
    assert next(data.val.batches()).x.is_contiguous(memory_format=torch.channels_last)


def test_cifar_ffcv_crops_are_padded_crops_and_flips_of_the_source(tmp_path: Path) -> None:
    written = write_fake_cifar100(tmp_path, n_train=12, n_test=6)
    _prepare(tmp_path, "cifar100")
    settings = {"root": str(tmp_path), "loader": "ffcv", "workers": 1}
    ffcv = build_data("cifar100", settings, "d", 4, 0, CPU)
    reference = build_data("cifar100", {"root": str(tmp_path)}, "d", 4, 0, CPU)
    for a, b in zip(ffcv.val.batches(), reference.val.batches()):
        assert torch.equal(a.y, b.y) and torch.allclose(a.x, b.x, atol=1e-5)
    mean = torch.tensor([0.5071, 0.4867, 0.4408]).view(3, 1, 1)
    std = torch.tensor([0.2675, 0.2565, 0.2761]).view(3, 1, 1)
    source = torch.from_numpy(written["train_data"].reshape(-1, 3, 32, 32)).float() / 255
    padded = torch.nn.functional.pad(source, (4, 4, 4, 4))
    flips = 0
    for batch in ffcv.train.batches(0):
        assert batch.y.tolist() == [written["train"][i] for i in batch.index.tolist()]
        for image, i in zip(batch.x, batch.index.tolist()):
            pixels = image * std + mean
            crops = [padded[i, :, t:t + 32, s:s + 32] for t in range(9) for s in range(9)]
            match = [k for k, c in enumerate(crops) if torch.allclose(c, pixels, atol=1e-5)]
            mirrored = [k for k, c in enumerate(crops)
                        if torch.allclose(c.flip(2), pixels, atol=1e-5)]
            assert match or mirrored, f"train image {i} is no padded crop of its source"
            flips += bool(mirrored) and not match
    assert 0 < flips < 12
    assert np.isclose(ffcv.info.labels.float().mean(), np.mean(written["train"]))


def test_uint8_batches_for_accelerators_equal_the_cpu_normalised_ones(tree: Path) -> None:
    """Off the CPU the decoders hand over uint8 and the device normalises: the same batches."""
    from kdflow.orchestrator.data.beton import beton_path
    from kdflow.orchestrator.data.ffcv_loaders import ffcv_data
    from kdflow.orchestrator.data.ffcv_ops import CenterCropDecoder, SeededResizedCropDecoder

    folder = str(tree / "ffcv" / "imagefolder")
    stats = (IMAGENET_MEAN, IMAGENET_STD)

    def build(normalise):
        return ffcv_data(beton_path(folder, "train"), beton_path(folder, "val"),
                         lambda _: SeededResizedCropDecoder(CROP, 0, normalise=normalise),
                         lambda _: CenterCropDecoder(CROP, 224 / 256, normalise=normalise),
                         lambda labels: torch.arange(len(labels)), 3, (3, CROP, CROP),
                         IMAGENET_MEAN, IMAGENET_STD, 5, 0, CPU, 1, False)

    fused, device_side = build(stats), build(None)
    for split in (lambda d: d.train.batches(2), lambda d: d.val.batches()):
        for a, b in zip(split(fused), split(device_side)):
            assert torch.equal(a.index, b.index) and torch.equal(a.y, b.y)
            assert torch.allclose(a.x, b.x, atol=1e-5)
    assert _same(list(_data(tree).train.batches(2)), list(fused.train.batches(2)))
