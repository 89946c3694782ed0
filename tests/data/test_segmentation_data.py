"""Segmentation datasets: synthetic_seg, voc, cityscapes; their transforms and loaders."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from kdflow.methods.errors import ConfigError
from kdflow.methods.tasks import IGNORE_INDEX, SEGMENTATION
from kdflow.orchestrator.data import DATASETS, build_data, validate_dataset
from kdflow.orchestrator.data.cityscapes import LABEL_TO_TRAIN, CityscapesConfig
from kdflow.orchestrator.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD
from kdflow.orchestrator.data.loaders import generator
from kdflow.orchestrator.data.seg_synthetic import SyntheticSegConfig, make_synthetic_seg
from kdflow.orchestrator.data.seg_transforms import Normalise, pad_collate, train_transform
from kdflow.orchestrator.data.voc import VOCConfig
from tests.datafiles import write_fake_cityscapes, write_fake_voc

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[2]
SMALL = {"num_train": 40, "num_val": 12, "image_size": 32}


def collect(batches):
    return [(b.x.clone(), b.y.clone(), b.index.clone()) for b in batches]


def assert_same(a, b):
    assert len(a) == len(b)
    for left, right in zip(a, b):
        for u, v in zip(left, right):
            assert torch.equal(u, v)


# --- synthetic_seg -------------------------------------------------------------------------

def test_synthetic_is_deterministic_with_every_class_and_ignore_pixels():
    cfg = SyntheticSegConfig(**SMALL)
    first, again = make_synthetic_seg(cfg), make_synthetic_seg(cfg)
    for u, v in zip(first, again):
        assert torch.equal(u, v)
    other = make_synthetic_seg(SyntheticSegConfig(**SMALL, seed=1))
    assert not torch.equal(first[0], other[0]) and not torch.equal(first[1], other[1])
    train_x, train_y, _, val_y = first
    assert train_x.shape == (40, 3, 32, 32) and val_y.shape == (12, 32, 32)
    assert train_y.dtype == torch.uint8
    for masks in (train_y, val_y):
        assert set(masks.unique().tolist()) == {0, 1, 2, 3, 4, IGNORE_INDEX}
    assert 0.01 < (train_y == IGNORE_INDEX).float().mean() < 0.3
    # images are not trivially separable by colour: pixel values vary within every class
    assert train_x.std() > 0.1


def test_build_synthetic_seg_data_info_and_batches():
    data = build_data("synthetic_seg", dict(SMALL, crop_size=24), "data", 8, 0, CPU,
                      channels_last=True)
    info = data.info
    assert info.task == SEGMENTATION and info.num_classes == 5 and info.num_samples == 40
    assert info.input_shape == (3, 24, 24)
    assert torch.equal(info.labels, torch.full((40,), -1, dtype=torch.int64))
    assert data.train.steps_per_epoch == 5
    batch = next(data.train.batches(0))
    assert batch.x.shape == (8, 3, 24, 24) and batch.x.dtype == torch.float32
    assert batch.x.is_contiguous(memory_format=torch.channels_last)
    assert batch.y.shape == (8, 24, 24) and batch.y.dtype == torch.int64
    assert batch.index.dtype == torch.int64
    val = next(data.val.batches())
    assert val.x.shape == (8, 3, 32, 32) and val.y.shape == (8, 32, 32)
    # normalised with the train split's statistics
    whole = torch.cat([b.x for b in data.val.batches()])
    assert whole.mean().abs() < 0.3 and 0.7 < whole.std() < 1.3


def test_synthetic_train_fraction_keeps_a_subset():
    data = build_data("synthetic_seg", dict(SMALL, train_fraction=0.5), "data", 8, 0, CPU)
    assert data.info.num_samples == 20 and data.train.steps_per_epoch == 3
    seen = torch.cat([b.index for b in data.train.batches(0)])
    assert sorted(seen.tolist()) == list(range(20))


# --- transforms ----------------------------------------------------------------------------

def banded_labels(h: int, w: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels (h, w) int64 of 16-pixel blocks, mask: labels with a 255 band 4 pixels either
    side of every boundary)."""
    gen = torch.Generator().manual_seed(seed)
    grid = torch.randint(0, 20, ((h + 15) // 16, (w + 15) // 16), generator=gen)
    labels = grid.repeat_interleave(16, 0).repeat_interleave(16, 1)[:h, :w]
    lab = labels[None, None].float()
    band = (F.max_pool2d(lab, 9, 1, 4) != -F.max_pool2d(-lab, 9, 1, 4))[0, 0]
    mask = labels.to(torch.uint8)
    mask[band] = IGNORE_INDEX
    return labels, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_train_transform_keeps_image_and_mask_aligned(dtype):
    """The image's pixels say their label; wherever the augmented mask is not 255, the
    augmented image must say the same label (bilinear blends happen only in the band)."""
    normalise = Normalise(None, None) if dtype == torch.float32 else Normalise((0.0,), (1 / 255,))
    for seed in range(30):
        h, w = 40 + seed, 72 - seed
        labels, mask = banded_labels(h, w, seed)
        image = labels.to(dtype)[None].repeat(3, 1, 1)
        crop = (48, 48) if seed % 2 else (24, 40)
        out, out_mask = train_transform(image, mask, crop, (0.5, 2.0), generator(7, 0, seed),
                                        normalise)
        assert out.shape == (3, *crop) and out.dtype == torch.float32
        assert out_mask.shape == crop and out_mask.dtype == torch.uint8
        keep = out_mask != IGNORE_INDEX
        assert keep.any()
        for c in range(3):
            assert torch.allclose(out[c][keep], out_mask[keep].float(), atol=1e-3)


def test_padding_is_the_mean_and_ignore_and_geometry_is_shared():
    """A uniform image/mask smaller than the crop: the scaled image sits at one side, padding
    is 0 (the mean after normalising) with mask 255; flips put it on the right."""
    image = torch.full((3, 20, 20), 2.0)
    mask = torch.full((20, 20), 3, dtype=torch.uint8)
    sides = set()
    for seed in range(40):
        out, out_mask = train_transform(image, mask, (64, 64), (0.5, 2.0),
                                        generator(0, 0, seed), Normalise(None, None))
        valid = out_mask != IGNORE_INDEX
        assert torch.equal(valid, out[0] != 0)
        assert torch.allclose(out[:, valid], torch.tensor(2.0)) and torch.all(out_mask[valid] == 3)
        rows, cols = valid.any(1).nonzero().flatten(), valid.any(0).nonzero().flatten()
        assert rows[0] == 0  # scaled image at the top, padding at the bottom
        sides.add("left" if cols[0] == 0 else "right")
        if cols[0] != 0:
            assert cols[-1] == 63
    assert sides == {"left", "right"}


def test_scale_range_is_respected_and_covered():
    image = torch.zeros(3, 40, 60)
    mask = torch.zeros(40, 60, dtype=torch.uint8)
    scales = []
    for seed in range(200):
        _, out_mask = train_transform(image, mask, (200, 200), (0.5, 2.0),
                                      generator(3, 1, seed), Normalise(None, None))
        valid = out_mask != IGNORE_INDEX
        h, w = int(valid.any(1).sum()), int(valid.any(0).sum())
        assert 20 <= h <= 80 and 30 <= w <= 120
        assert abs(w / 60 - h / 40) <= 1 / 40 + 1 / 60  # one factor for both sides
        scales.append(w / 60)
    assert min(scales) < 0.6 and max(scales) > 1.9
    # a fixed scale of 1 with the image's own size is the image, maybe flipped
    labels, banded = banded_labels(32, 48, 0)
    _, out_mask = train_transform(labels.float()[None].repeat(3, 1, 1), banded, (32, 48),
                                  (1.0, 1.0), generator(0), Normalise(None, None))
    assert torch.equal(out_mask, banded) or torch.equal(out_mask, banded.flip(-1))


def test_pad_collate_pads_images_with_zero_and_masks_with_ignore():
    a = (torch.ones(3, 4, 5), torch.zeros(4, 5, dtype=torch.uint8), 7)
    b = (torch.ones(3, 6, 3), torch.ones(6, 3, dtype=torch.uint8), 8)
    x, y, index = pad_collate([a, b])
    assert x.shape == (2, 3, 6, 5) and y.shape == (2, 6, 5) and index.tolist() == [7, 8]
    assert torch.all(x[0, :, 4:] == 0) and torch.all(y[0, 4:] == IGNORE_INDEX)
    assert torch.all(x[1, :, :, 3:] == 0) and torch.all(y[1, :, 3:] == IGNORE_INDEX)
    assert torch.all(y[0, :4, :5] == 0) and torch.all(y[1, :6, :3] == 1)


# --- loaders -------------------------------------------------------------------------------

def test_train_batches_depend_only_on_seed_epoch_and_step():
    data = build_data("synthetic_seg", SMALL, "data", 8, 5, CPU)
    whole = collect(data.train.batches(1))
    assert len(whole) == 5
    assert sorted(torch.cat([b[2] for b in whole]).tolist()) == list(range(40))
    assert_same(collect(data.train.batches(1, start_step=3)), whole[3:])
    assert list(data.train.batches(1, start_step=5)) == []
    rebuilt = build_data("synthetic_seg", SMALL, "data", 8, 5, CPU)
    assert_same(collect(rebuilt.train.batches(1)), whole)
    for world in (2, 3):
        shards = [collect(data.train.batches(1, shard=(r, world))) for r in range(world)]
        for step, batch in enumerate(whole):
            for part in range(3):
                joined = torch.cat([shards[r][step][part] for r in range(world)])
                assert torch.equal(joined, batch[part])
    tiny = build_data("synthetic_seg", SMALL, "data", 2, 5, CPU)  # 2 rows for 3 ranks
    parts = [collect(tiny.train.batches(0, shard=(r, 3))) for r in range(3)]
    assert [len(p) for p in parts] == [20, 20, 20]
    assert parts[2][0][0].shape == (0, 3, 32, 32) and parts[2][0][1].shape == (0, 32, 32)
    other_epoch = collect(data.train.batches(2))
    assert not torch.equal(other_epoch[0][0], whole[0][0])
    other_seed = collect(build_data("synthetic_seg", SMALL, "data", 8, 6, CPU).train.batches(1))
    assert not torch.equal(other_seed[0][2], whole[0][2])
    with pytest.raises(ValueError):
        next(data.train.batches(1, start_step=6))


def test_a_sample_is_augmented_the_same_in_any_batch():
    """Augmentation is seeded per sample: batch size and position do not change it."""
    small = build_data("synthetic_seg", SMALL, "data", 4, 5, CPU)
    large = build_data("synthetic_seg", SMALL, "data", 16, 5, CPU)
    by_index = {}
    for x, y, index in collect(small.train.batches(0)):
        for row, i in enumerate(index.tolist()):
            by_index[i] = (x[row], y[row])
    for x, y, index in collect(large.train.batches(0)):
        for row, i in enumerate(index.tolist()):
            assert torch.equal(by_index[i][0], x[row]) and torch.equal(by_index[i][1], y[row])


def test_eval_covers_every_sample_once_in_order():
    data = build_data("synthetic_seg", SMALL, "data", 5, 0, CPU)
    _, _, _, val_y = make_synthetic_seg(SyntheticSegConfig(**SMALL))
    batches = collect(data.val.batches())
    assert torch.cat([b[2] for b in batches]).tolist() == list(range(12))
    assert torch.equal(torch.cat([b[1] for b in batches]), val_y.long())
    for world in (2, 3):
        seen = []
        for rank in range(world):
            parts = collect(data.val.batches(shard=(rank, world)))
            seen += [i for b in parts for i in b[2].tolist()]
        assert sorted(seen) == list(range(12))


# --- voc -----------------------------------------------------------------------------------

def test_fake_voc_loads_with_its_labels_and_pads_eval_batches(tmp_path):
    written = write_fake_voc(tmp_path)
    settings = {"root": str(tmp_path), "crop_size": 16, "workers": 0}
    data = build_data("voc", settings, "study.datasets.voc", 4, 0, CPU)
    assert data.info.task == SEGMENTATION and data.info.num_classes == 21
    assert data.info.num_samples == 6 and data.info.input_shape == (3, 16, 16)
    images, masks = written["val"]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    batches = collect(data.val.batches())
    assert torch.cat([b[2] for b in batches]).tolist() == list(range(5))
    for x, y, index in batches:
        height, width = max(masks[i].shape[0] for i in index), max(masks[i].shape[1] for i in index)
        assert y.shape[1:] == (height, width)
        for row, i in enumerate(index.tolist()):
            h, w = masks[i].shape
            assert torch.equal(y[row, :h, :w], torch.from_numpy(masks[i]).long())
            assert torch.all(y[row, h:] == IGNORE_INDEX)
            assert torch.all(y[row, :, w:] == IGNORE_INDEX)
            assert torch.all(x[row, :, h:] == 0) and torch.all(x[row, :, :, w:] == 0)
            pixels = torch.from_numpy(images[i]).permute(2, 0, 1).float() / 255
            assert (x[row, :, :h, :w] * std + mean - pixels).abs().max() < 0.05  # JPEG
    assert any(b[1].shape[1:] != (24, 32) for b in batches)  # sizes differ: padding happened
    train = collect(data.train.batches(0))
    assert [len(b[2]) for b in train] == [4, 2]
    labels = set(np.concatenate([m.ravel() for m in written["train"][1]]).tolist())
    for x, y, _ in train:
        assert x.shape[1:] == (3, 16, 16) and set(y.unique().tolist()) <= labels


def test_voc_root_may_be_the_devkit_or_voc2012_folder_and_workers_give_the_same_batches(tmp_path):
    write_fake_voc(tmp_path, {"train": 5, "val": 3})
    base = {"crop_size": 20, "workers": 0}
    reference = collect(build_data("voc", dict(base, root=str(tmp_path)), "d", 2, 1, CPU)
                        .train.batches(0))
    for root in (tmp_path / "VOCdevkit", tmp_path / "VOCdevkit" / "VOC2012"):
        data = build_data("voc", dict(base, root=str(root)), "d", 2, 1, CPU)
        assert_same(collect(data.train.batches(0)), reference)
    workers = build_data("voc", dict(base, root=str(tmp_path), workers=2), "d", 2, 1, CPU)
    assert_same(collect(workers.train.batches(0)), reference)


def test_missing_data_names_root_and_says_kdflow_never_downloads(tmp_path):
    for name in ("voc", "cityscapes"):
        with pytest.raises(ConfigError) as err:
            validate_dataset(name, {"root": str(tmp_path / "absent")}, f"study.datasets.{name}")
        assert err.value.field == f"study.datasets.{name}.root"
        assert "never downloads" in err.value.render()
        with pytest.raises(ConfigError) as err:  # the folder exists but holds no dataset
            validate_dataset(name, {"root": str(tmp_path)}, f"study.datasets.{name}")
        assert err.value.field == f"study.datasets.{name}.root"
        cfg = validate_dataset(name, {"root": str(tmp_path / "absent")}, "d", require_data=False)
        assert cfg.task == SEGMENTATION


def test_voc_missing_split_list_or_mask_names_the_field(tmp_path):
    write_fake_voc(tmp_path, {"train": 2, "val": 2})
    with pytest.raises(ConfigError) as err:
        validate_dataset("voc", {"root": str(tmp_path), "train_split": "trainaug"}, "d")
    assert err.value.field == "d.train_split"
    (tmp_path / "VOCdevkit/VOC2012/SegmentationClass/2007_val001.png").unlink()
    with pytest.raises(ConfigError) as err:
        validate_dataset("voc", {"root": str(tmp_path)}, "d")
    assert err.value.field == "d.mask_dir" and "2007_val001" in err.value.render()


# --- cityscapes ----------------------------------------------------------------------------

def test_cityscapes_label_ids_map_to_the_19_train_ids():
    train_ids = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
    for train_id, label_id in enumerate(train_ids):
        assert LABEL_TO_TRAIN[label_id] == train_id
    for label_id in set(range(256)) - set(train_ids):
        assert LABEL_TO_TRAIN[label_id] == IGNORE_INDEX


def test_fake_cityscapes_loads_with_mapped_labels(tmp_path):
    written = write_fake_cityscapes(tmp_path, train_ids_for=("bremen_000001_000019",))
    settings = {"root": str(tmp_path), "crop_height": 8, "crop_width": 16, "workers": 0}
    data = build_data("cityscapes", settings, "study.datasets.cityscapes", 2, 0, CPU)
    assert data.info.task == SEGMENTATION and data.info.num_classes == 19
    assert data.info.num_samples == 4 and data.info.input_shape == (3, 8, 16)
    images, ids = written["val"]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    batches = collect(data.val.batches())
    y = torch.cat([b[1] for b in batches])
    x = torch.cat([b[0] for b in batches])
    expected = torch.from_numpy(np.stack([LABEL_TO_TRAIN[m] for m in ids])).long()
    assert torch.equal(y, expected)
    assert (y == IGNORE_INDEX).any() and (y == 0).any() and (y == 18).any()
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(x * std + mean, pixels, atol=1e-5)  # PNG: exact
    # the train split's bremen_000001 has a labelTrainIds file, which wins over its labelIds
    cfg = CityscapesConfig(root=str(tmp_path / "cityscapes"))
    pairs = cfg.pairs("train")
    assert [p[1].rsplit("_gtFine_", 1)[1] for p in pairs].count("labelTrainIds.png") == 1
    train_masks = written["train"][1]
    loaded = data.train.batches(0).__next__()  # crops: values from the mapping or + 100
    assert set(loaded.y.unique().tolist()) <= (set(LABEL_TO_TRAIN[np.concatenate(
        [m.ravel() for m in train_masks])].tolist()) | {m + 100 for m in range(34)})


def test_cityscapes_missing_label_map_names_root(tmp_path):
    write_fake_cityscapes(tmp_path, {"train": 2, "val": 2})
    next((tmp_path / "cityscapes/gtFine/val").rglob("*_labelIds.png")).unlink()
    with pytest.raises(ConfigError) as err:
        validate_dataset("cityscapes", {"root": str(tmp_path)}, "d")
    assert err.value.field == "d.root" and "label map" in err.value.render()


# --- settings ------------------------------------------------------------------------------

@pytest.mark.parametrize("name,settings,field", [
    ("synthetic_seg", {"num_classes": 8}, "num_classes"),
    ("synthetic_seg", {"scale_min": 2.0, "scale_max": 1.0}, "scale_max"),
    ("synthetic_seg", {"scale_min": 0}, "scale_min"),
    ("voc", {"crop_size": 0}, "crop_size"),
    ("cityscapes", {"crop_width": -1}, "crop_width"),
    ("cityscapes", {"workers": -1}, "workers"),
])
def test_bad_settings_name_their_field(name, settings, field):
    with pytest.raises(ConfigError) as err:
        validate_dataset(name, settings, "d", require_data=False)
    assert err.value.field == f"d.{field}"


@pytest.mark.parametrize("name,Config", [("synthetic_seg", SyntheticSegConfig),
                                         ("voc", VOCConfig), ("cityscapes", CityscapesConfig)])
def test_yaml_configs_hold_the_settings_at_their_defaults(name, Config):
    assert DATASETS.get(name, "d").Config is Config
    values = yaml.safe_load((REPO / "configs" / "dataset" / f"{name}.yaml").read_text())
    defaults = Config()
    for key, value in values.items():
        if key == "root":
            assert value == "${data.root}"
        else:
            assert getattr(defaults, key) == value, key
    cfg = validate_dataset(name, {k: v for k, v in values.items() if k != "root"}, "d",
                           require_data=False)
    assert cfg.task == SEGMENTATION and cfg.input_shape()[0] == 3


def test_mask_resizing_by_index_matches_torch_nearest_exact():
    from kdflow.orchestrator.data.seg_transforms import _nearest
    for size, scaled in ((37, 50), (500, 1000), (375, 190), (375, 561), (64, 77), (64, 48)):
        column = torch.arange(size, dtype=torch.float32)[None, None, :, None]
        expected = F.interpolate(column, size=(scaled, 1), mode="nearest-exact")[0, 0, :, 0]
        assert torch.equal(_nearest(size, scaled, 0, scaled), expected.long())
