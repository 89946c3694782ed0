"""The data layer: splits, deterministic resumable batches, augmentation, datasets' checks."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from datafiles import write_fake_cifar100, write_jpeg_tree
from kdflow.methods.errors import ConfigError
from kdflow.orchestrator.data import DATASETS, Batch, build_data, validate_dataset
from kdflow.orchestrator.data.digits import DigitsConfig, load_digit_splits
from kdflow.orchestrator.data.loaders import generator
from kdflow.orchestrator.data.tensor_loaders import augment

CPU = torch.device("cpu")


def digits(batch_size: int = 100, seed: int = 0, **settings) -> "object":
    return build_data("digits", settings, "study.datasets.digits", batch_size, seed, CPU)


def assert_same(a: list[Batch], b: list[Batch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.x, y.x) and torch.equal(x.y, y.y) and torch.equal(x.index, y.index)


# --- digits -------------------------------------------------------------------------------

def test_digits_split_is_deterministic_and_stratified() -> None:
    a, b = digits(), digits()
    assert a.info.num_samples == 1437 and a.info.num_classes == 10
    assert a.info.input_shape == (3, 16, 16)
    assert torch.equal(a.info.labels, b.info.labels) and a.info.labels.dtype == torch.int64
    assert_same(list(a.val.batches()), list(b.val.batches()))
    _, train_y, _, val_y = load_digit_splits(DigitsConfig())
    all_counts = torch.bincount(torch.cat([train_y, val_y]), minlength=10).float()
    val_counts = torch.bincount(val_y, minlength=10).float()
    assert ((val_counts - 0.2 * all_counts).abs() <= 1).all()


def test_resume_mid_epoch_gives_the_tail_of_the_epoch() -> None:
    train = digits(batch_size=128).train
    assert train.steps_per_epoch == 12  # 1437 / 128, last partial batch kept
    torch.manual_seed(1)
    full = list(train.batches(3))
    torch.manual_seed(2)  # the global RNG must not matter
    assert_same(list(train.batches(3, start_step=5)), full[5:])
    assert list(train.batches(3, start_step=12)) == []
    assert len(full[-1].y) == 1437 - 11 * 128
    assert torch.equal(torch.cat([b.index for b in full]).sort().values, torch.arange(1437))
    other = torch.cat([b.index for b in train.batches(4)])
    assert not torch.equal(torch.cat([b.index for b in full]), other)


def test_augmentation_changes_images_but_keeps_labels_and_indices() -> None:
    plain, augmented = digits(pad=0), digits(pad=2)
    labels = augmented.info.labels
    changed = 0
    for p, a in zip(plain.train.batches(0), augmented.train.batches(0)):
        assert torch.equal(p.index, a.index) and torch.equal(p.y, a.y)
        assert torch.equal(a.y, labels[a.index])
        assert a.x.shape == p.x.shape and a.x.dtype == torch.float32
        changed += int((a.x != p.x).flatten(1).any(1).sum())
    assert changed > 1000  # 1 in 25 offsets is the identity


def test_augment_crops_a_window_of_the_zero_padded_image() -> None:
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.uint8).view(2, 3, 5, 5) + 1
    out = augment(x, torch.Generator().manual_seed(0), pad=2, hflip=True)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        windows = [padded[i, :, r:r + 5, c:c + 5] for r in range(5) for c in range(5)]
        windows += [w.flip(2) for w in windows]
        assert any(torch.equal(out[i], w) for w in windows)
    assert out.dtype == torch.uint8


def test_eval_loader_covers_val_once_without_augmentation() -> None:
    data = digits(batch_size=64)
    batches = list(data.val.batches())
    train_x, _, val_x, val_y = load_digit_splits(DigitsConfig())
    assert torch.equal(torch.cat([b.index for b in batches]), torch.arange(len(val_y)))
    assert torch.equal(torch.cat([b.y for b in batches]), val_y)
    expected = (val_x - train_x.mean()) / train_x.std()
    assert torch.allclose(torch.cat([b.x for b in batches]), expected, atol=1e-6)


# --- CIFAR ---------------------------------------------------------------------------------

def test_fake_cifar100_loads_with_its_labels(tmp_path: Path) -> None:
    written = write_fake_cifar100(tmp_path)
    data = build_data("cifar100", {"root": str(tmp_path)}, "study.datasets.cifar100", 16, 0, CPU)
    assert data.info.num_classes == 100 and data.info.input_shape == (3, 32, 32)
    assert data.info.labels.tolist() == written["train"]
    val = list(data.val.batches())
    assert torch.cat([b.y for b in val]).tolist() == written["test"]
    first = torch.from_numpy(written["test_data"][0].reshape(3, 32, 32)).float() / 255
    mean = torch.tensor([0.5071, 0.4867, 0.4408]).view(3, 1, 1)
    std = torch.tensor([0.2675, 0.2565, 0.2761]).view(3, 1, 1)
    assert torch.allclose(val[0].x[0], (first - mean) / std, atol=1e-6)
    for batch in data.train.batches(0):
        assert torch.equal(batch.y, data.info.labels[batch.index])


def expected_mean() -> torch.Tensor:
    """CIFAR-100's published per-channel mean, (3, 1, 1)."""
    return torch.tensor([0.5071, 0.4867, 0.4408]).view(3, 1, 1)


def expected_std() -> torch.Tensor:
    """CIFAR-100's published per-channel standard deviation, (3, 1, 1)."""
    return torch.tensor([0.2675, 0.2565, 0.2761]).view(3, 1, 1)


def _reference_cifar_batches(pixels: np.ndarray, labels: list, batch_size: int, seed: int,
                             epoch: int) -> list[Batch]:
    """The train batches of ``epoch`` computed one image at a time from the raw pixels: the
    epoch's permutation, then per step the crop offsets of the 4-pixel zero-padded image and
    the flips (both drawn from the step's generator), then CIFAR-100 normalisation."""
    images = torch.from_numpy(pixels).view(-1, 3, 32, 32)
    mean, std = expected_mean(), expected_std()
    order = torch.randperm(len(images), generator=generator(seed, epoch))
    batches = []
    for step in range(math.ceil(len(images) / batch_size)):
        index = order[step * batch_size:(step + 1) * batch_size]
        gen = generator(seed, epoch, step)
        offsets = torch.randint(0, 9, (len(index), 2), generator=gen)
        flips = torch.rand(len(index), generator=gen) < 0.5
        xs = []
        for i, (row, col), flip in zip(index.tolist(), offsets.tolist(), flips.tolist()):
            padded = torch.zeros(3, 40, 40, dtype=torch.uint8)
            padded[:, 4:36, 4:36] = images[i]
            crop = padded[:, row:row + 32, col:col + 32]
            crop = crop.flip(2) if flip else crop
            xs.append((crop.float() / 255 - mean) / std)
        batches.append(Batch(torch.stack(xs), torch.tensor(labels)[index], index))
    return batches


def test_cifar_resident_and_host_loaders_match_a_per_image_reference(tmp_path: Path) -> None:
    """Both loaders (the split kept on the training device and augmented there, or kept on
    the host and each batch moved) give the batches of an independent per-image computation;
    on a GPU they also give each other's bits, so augmenting on the device changes nothing."""
    written = write_fake_cifar100(tmp_path)
    device = torch.device("cuda") if torch.cuda.is_available() else CPU
    runs = {resident: build_data("cifar100", {"root": str(tmp_path), "device_resident": resident},
                                 "study.datasets.cifar100", 16, 7, device)
            for resident in (True, False)}
    assert runs[True].train.loader.images.device.type == device.type  # where each split lives
    assert runs[False].train.loader.images.device == CPU
    expected = _reference_cifar_batches(written["train_data"], written["train"], 16, 7, 2)
    val_x = torch.from_numpy(written["test_data"]).view(-1, 3, 32, 32).float() / 255
    val_x = (val_x - expected_mean()) / expected_std()
    for data in runs.values():
        val = list(data.val.batches())
        torch.testing.assert_close(torch.cat([b.x.cpu() for b in val]), val_x, rtol=0, atol=1e-6)
        assert torch.cat([b.y.cpu() for b in val]).tolist() == written["test"]
        got = [Batch(b.x.cpu(), b.y.cpu(), b.index.cpu()) for b in data.train.batches(2)]
        assert [torch.equal(g.index, e.index) and torch.equal(g.y, e.y)
                for g, e in zip(got, expected)] == [True] * len(expected)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g.x, e.x, rtol=0, atol=1e-6)
    assert_same(list(runs[True].train.batches(2)), list(runs[False].train.batches(2)))
    assert_same(list(runs[True].val.batches()), list(runs[False].val.batches()))


def test_missing_cifar_root_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        validate_dataset("cifar100", {"root": str(tmp_path / "nowhere")}, "study.datasets.cifar100")
    assert "study.datasets.cifar100.root" in str(err.value)
    assert "data.download=true" in str(err.value)


def test_unknown_dataset_and_setting_are_config_errors() -> None:
    with pytest.raises(ConfigError) as err:
        validate_dataset("mnist", {}, "study.datasets.mnist")
    assert "digits" in str(err.value) and "cifar100" in str(err.value)
    with pytest.raises(ConfigError, match="study.datasets.digits.hflp"):
        validate_dataset("digits", {"hflp": True}, "study.datasets.digits")
    assert {"digits", "cifar10", "cifar100", "imagefolder", "synthetic"} <= set(DATASETS)


# --- imagefolder ---------------------------------------------------------------------------

def test_imagefolder_loads_deterministic_batches(tmp_path: Path) -> None:
    write_jpeg_tree(tmp_path, {"train": 5, "val": 2})
    settings = {"root": str(tmp_path), "image_size": 32, "workers": 0}
    data = build_data("imagefolder", settings, "study.datasets.imagefolder", 4, 0, CPU)
    assert data.info.num_samples == 10 and data.info.num_classes == 2
    assert data.info.labels.tolist() == [0] * 5 + [1] * 5
    full = list(data.train.batches(1))
    assert data.train.steps_per_epoch == 3 and full[0].x.shape == (4, 3, 32, 32)
    assert torch.equal(full[0].y, data.info.labels[full[0].index])
    assert_same(list(data.train.batches(1, start_step=1)), full[1:])
    workers = build_data("imagefolder", {**settings, "workers": 2},
                         "study.datasets.imagefolder", 4, 0, CPU)
    assert_same(list(workers.train.batches(1)), full)
    val = list(data.val.batches())
    assert torch.cat([b.index for b in val]).tolist() == [0, 1, 2, 3]
    assert val[0].x.shape == (4, 3, 32, 32)


def test_empty_or_missing_imagefolder_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    for root in (tmp_path, tmp_path / "nowhere"):
        with pytest.raises(ConfigError, match=r"study\.datasets\.imagefolder\.root"):
            validate_dataset("imagefolder", {"root": str(root)}, "study.datasets.imagefolder")
    (tmp_path / "train" / "cat").mkdir()
    (tmp_path / "val" / "cat").mkdir()
    with pytest.raises(ConfigError, match="no image files"):
        validate_dataset("imagefolder", {"root": str(tmp_path)}, "study.datasets.imagefolder")


# --- imagewoof -----------------------------------------------------------------------------

WOOF_SYNSETS = ("n02086240", "n02087394", "n02088364", "n02089973", "n02093754", "n02096294",
                "n02099601", "n02105641", "n02111889", "n02115641")


def test_imagewoof_reads_an_imagewoof2_tree_under_data_root(tmp_path: Path) -> None:
    write_jpeg_tree(tmp_path / "imagewoof2", {"train": 2, "val": 1}, classes=WOOF_SYNSETS)
    settings = {"root": str(tmp_path / "imagewoof2"), "image_size": 32, "workers": 0}
    data = build_data("imagewoof", settings, "study.datasets.imagewoof", 4, 0, CPU)
    assert data.info.num_classes == 10 and data.info.num_samples == 20
    assert next(iter(data.train.batches(1))).x.shape == (4, 3, 32, 32)
    cfg = validate_dataset("imagewoof", settings, "study.datasets.imagewoof")
    assert cfg.betons() == str(tmp_path / "imagewoof2" / "ffcv" / "imagewoof")


def test_imagewoof_with_other_than_ten_classes_is_refused(tmp_path: Path) -> None:
    write_jpeg_tree(tmp_path, {"train": 1, "val": 1}, classes=WOOF_SYNSETS[:9])
    with pytest.raises(ConfigError, match=r"study\.datasets\.imagewoof\.num_classes.*is 10"):
        validate_dataset("imagewoof", {"root": str(tmp_path)}, "study.datasets.imagewoof")


# --- synthetic -----------------------------------------------------------------------------

def test_synthetic_is_deterministic_and_learnable() -> None:
    a = build_data("synthetic", {}, "study.datasets.synthetic", 64, 0, CPU)
    b = build_data("synthetic", {}, "study.datasets.synthetic", 64, 0, CPU)
    assert a.info.num_samples == 256 and a.info.num_classes == 4
    assert a.info.input_shape == (3, 16, 16)
    assert_same(list(a.val.batches()), list(b.val.batches()))
    train = list(a.train.batches(0))
    x, y = torch.cat([t.x for t in train]).flatten(1), torch.cat([t.y for t in train])
    centroids = torch.stack([x[y == c].mean(0) for c in range(4)])
    val = list(a.val.batches())
    vx, vy = torch.cat([v.x for v in val]).flatten(1), torch.cat([v.y for v in val])
    accuracy = (torch.cdist(vx, centroids).argmin(1) == vy).float().mean()
    assert accuracy > 0.95


def test_train_fraction_is_a_fixed_stratified_subset():
    full = build_data("digits", {}, "d", 64, 0, torch.device("cpu"))
    part = build_data("digits", {"train_fraction": 0.4}, "d", 64, 0, torch.device("cpu"))
    other_seed = build_data("digits", {"train_fraction": 0.4}, "d", 64, 5, torch.device("cpu"))
    n_full, n_part = full.info.num_samples, part.info.num_samples
    assert abs(n_part - 0.4 * n_full) <= 10
    counts_full = torch.bincount(full.info.labels, minlength=10).float()
    counts_part = torch.bincount(part.info.labels, minlength=10).float()
    assert torch.allclose(counts_part, 0.4 * counts_full, atol=1.0)  # stratified
    assert torch.equal(part.info.labels, other_seed.info.labels)  # run seed does not change it
    indices = torch.cat([b.index for b in part.train.batches(0)])
    assert sorted(indices.tolist()) == list(range(n_part))  # CRD's ids index the subset
    assert part.val.batches().__next__().x.shape == full.val.batches().__next__().x.shape


@pytest.mark.parametrize("value", [0, 1.5, -0.2, True])
def test_bad_train_fraction_names_the_field(value):
    with pytest.raises(ConfigError, match="study.datasets.digits.train_fraction"):
        validate_dataset("digits", {"train_fraction": value}, "study.datasets.digits")
