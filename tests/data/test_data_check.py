"""`kdflow data check DATASET`: every file of the splits decoded, exactly the unreadable ones
listed with their reasons, exit 1 when there are any and 0 on a clean dataset."""
from __future__ import annotations

from pathlib import Path
from typing import List, Set

import pytest
from datafiles import write_fake_cifar100, write_fake_cityscapes, write_fake_voc, write_jpeg_tree

from kdflow.launch.data_cli import check_command
from kdflow.methods.errors import ConfigError


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


def check(capsys, dataset: str, *overrides: str) -> tuple[int, Set[str], str]:
    """Exit status, the files listed as unreadable, and the output of the check."""
    code = check_command(dataset, list(overrides), progress=False)
    out = capsys.readouterr().out
    listed = {line.split(": ", 1)[0] for line in out.splitlines() if line.startswith("/")}
    return code, listed, out


def resolved(*paths: Path) -> Set[str]:
    return {str(p.resolve()) for p in paths}


@pytest.mark.parametrize("workers", [0, 2])
def test_image_tree_lists_exactly_the_unreadable_files(tmp_path: Path, capsys,
                                                       workers: int) -> None:
    tree = tmp_path / "tree"
    write_jpeg_tree(tree, {"train": 3, "val": 2})
    assert check(capsys, "imagefolder", f"data.root={tree}")[:2] == (0, set())
    bad = [truncate(tree / "train" / "dog" / "1.jpg"), tree / "val" / "cat" / "0.jpg"]
    bad[1].write_bytes(b"not a jpeg")
    code, listed, out = check(capsys, "imagefolder", f"data.root={tree}",
                              f"prepare.workers={workers}")
    assert code == 1 and listed == resolved(*bad)
    assert "image file is truncated" in out and "cannot identify image file" in out
    assert "2 of 10 files of imagefolder cannot be read" in out


def test_imagewoof_is_checked_as_an_image_tree(tmp_path: Path, capsys) -> None:
    breeds = [f"n0{i}" for i in range(10)]
    write_jpeg_tree(tmp_path / "imagewoof2", {"train": 1, "val": 1}, classes=breeds)
    code, listed, out = check(capsys, "imagewoof", f"data.root={tmp_path}")
    assert (code, listed) == (0, set()) and "all 20 files of imagewoof are readable" in out
    bad = truncate(tmp_path / "imagewoof2" / "val" / "n03" / "0.jpg")
    assert check(capsys, "imagewoof", f"data.root={tmp_path}")[:2] == (1, resolved(bad))


def test_cifar_lists_the_corrupt_pickle(tmp_path: Path, capsys) -> None:
    write_fake_cifar100(tmp_path)
    assert check(capsys, "cifar100", f"data.root={tmp_path}")[:2] == (0, set())
    bad = truncate(tmp_path / "cifar-100-python" / "test")
    assert check(capsys, "cifar100", f"data.root={tmp_path}")[:2] == (1, resolved(bad))


def test_segmentation_datasets_list_bad_images_and_masks(tmp_path: Path, capsys) -> None:
    write_fake_voc(tmp_path / "voc")
    voc = tmp_path / "voc" / "VOCdevkit" / "VOC2012"
    bad: List[Path] = [truncate(voc / "JPEGImages" / "2007_train002.jpg"),
                       truncate(voc / "SegmentationClass" / "2007_val001.png")]
    assert check(capsys, "voc", f"data.root={tmp_path / 'voc'}")[:2] == (1, resolved(*bad))
    write_fake_cityscapes(tmp_path / "cs")
    city = tmp_path / "cs" / "cityscapes"
    assert check(capsys, "cityscapes", f"data.root={tmp_path / 'cs'}")[:2] == (0, set())
    image = next((city / "leftImg8bit" / "val").glob("*/*.png"))
    image.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert check(capsys, "cityscapes", f"data.root={tmp_path / 'cs'}")[:2] == (1, resolved(image))


@pytest.mark.parametrize("dataset", ["digits", "synthetic", "synthetic_seg"])
def test_datasets_without_files_have_nothing_to_check(capsys, dataset: str) -> None:
    code, _, out = check(capsys, dataset)
    assert code == 0 and "nothing to check" in out


def test_a_missing_tree_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"prepare\.dataset\.root"):
        check_command("imagefolder", [f"data.root={tmp_path / 'nowhere'}"], progress=False)


def test_the_kdflow_command_runs_the_check(tmp_path: Path, capsys) -> None:
    from kdflow.launch.cli import main

    tree = tmp_path / "tree"
    write_jpeg_tree(tree, {"train": 2, "val": 1})
    assert main(["data", "check", "imagefolder", f"data.root={tree}"]) == 0
    bad = truncate(tree / "val" / "dog" / "0.jpg")
    capsys.readouterr()
    assert main(["data", "check", "imagefolder", f"data.root={tree}"]) == 1
    assert str(bad.resolve()) in capsys.readouterr().out
    assert main(["data", "check", "imagefolder", f"data.root={tmp_path / 'none'}"]) == 2
