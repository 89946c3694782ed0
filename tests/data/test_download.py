"""``data.download=true``: CIFAR fetched from a mirror on a real local HTTP server, verified,
unpacked atomically; failures keep nothing; the download settings change no job id."""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, Iterator, List

import pytest
import torch
from datafiles import write_fake_cifar10, write_fake_cifar100

from kdflow.launch.cli import main
from kdflow.methods.errors import ConfigError
from kdflow.orchestrator.data import build_data, validate_dataset
from kdflow.orchestrator.study import expand_study

ARCHIVES = {"cifar10": ("cifar-10-python.tar.gz", "cifar-10-batches-py"),
            "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python")}


class Mirror:
    """A mirror on 127.0.0.1 serving ``files`` (URL path -> bytes); ``truncate`` announces
    each file's full length but closes the connection after half of it."""

    def __init__(self) -> None:
        self.files: Dict[str, bytes] = {}
        self.requests: List[str] = []
        self.truncate = False
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802  (http.server's name)
                mirror.requests.append(self.path)
                body = mirror.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:len(body) // 2] if mirror.truncate else body)
                self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/cifar"
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def tar_gz(folder: Path, extra: Dict[str, bytes] | None = None) -> bytes:
    """``folder`` (and files ``extra``: name -> content) as the bytes of a .tar.gz."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        tar.add(folder, arcname=folder.name)
        for name, content in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return out.getvalue()


@pytest.fixture
def mirror() -> Iterator[Mirror]:
    server = Mirror()
    yield server
    server.close()


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, tuple]:
    """dataset -> (archive bytes, its sha256, the labels written)."""
    made = {}
    for dataset, write in (("cifar10", write_fake_cifar10), ("cifar100", write_fake_cifar100)):
        source = tmp_path_factory.mktemp(dataset)
        labels = write(source)
        body = tar_gz(source / ARCHIVES[dataset][1])
        made[dataset] = (body, hashlib.sha256(body).hexdigest(), labels)
    return made


def serve(mirror: Mirror, archives: Dict[str, tuple], dataset: str = "cifar10") -> str:
    """Put ``dataset``'s archive on ``mirror``; returns its sha256."""
    body, sha256, _ = archives[dataset]
    mirror.files[f"/cifar/{ARCHIVES[dataset][0]}"] = body
    return sha256


def settings(root: Path, mirror: Mirror, sha256: str | None, download: bool = True) -> dict:
    return {"root": str(root), "download": download, "mirror": mirror.url, "sha256": sha256}


def assert_nothing_kept(root: Path) -> None:
    assert not root.exists() or os.listdir(root) == []


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_download_lands_verified_files_that_load_and_is_not_repeated(
        tmp_path: Path, mirror: Mirror, archives, capsys, dataset: str) -> None:
    sha256 = serve(mirror, archives, dataset)
    root = tmp_path / "data"
    field = f"study.datasets.{dataset}"
    validate_dataset(dataset, settings(root, mirror, sha256), field)
    assert os.listdir(root) == [ARCHIVES[dataset][1]]  # no work folder left
    err = capsys.readouterr().err
    assert f"downloading {mirror.url}/{ARCHIVES[dataset][0]}" in err and "100%" in err
    assert len(err.splitlines()) < 10  # a few lines, not a line per chunk
    data = build_data(dataset, {"root": str(root)}, field, 8, 0, torch.device("cpu"))
    assert data.info.labels.tolist() == archives[dataset][2]["train"]
    assert torch.cat([b.y for b in data.val.batches()]).tolist() == archives[dataset][2]["test"]
    assert len(mirror.requests) == 1
    validate_dataset(dataset, settings(root, mirror, sha256), field)  # complete: no request
    assert len(mirror.requests) == 1 and capsys.readouterr().err == ""


def test_a_bad_checksum_names_both_digests_and_the_setting_and_keeps_nothing(
        tmp_path: Path, mirror: Mirror, archives) -> None:
    got = serve(mirror, archives)
    root = tmp_path / "data"
    with pytest.raises(ConfigError) as err:
        validate_dataset("cifar10", settings(root, mirror, "ab" * 32), "study.datasets.cifar10")
    text = str(err.value)
    assert err.value.field == "study.datasets.cifar10.sha256"
    assert "\n" not in text and f"{mirror.url}/cifar-10-python.tar.gz" in text
    assert f"expected {'ab' * 32}" in text and f"is {got}" in text
    assert "data.mirror.sha256.cifar10" in text
    assert_nothing_kept(root)


def test_a_mirror_without_sha256_is_held_to_the_authors_md5(tmp_path: Path, mirror: Mirror,
                                                            archives) -> None:
    serve(mirror, archives)
    root = tmp_path / "data"
    with pytest.raises(ConfigError) as err:
        validate_dataset("cifar10", settings(root, mirror, None), "study.datasets.cifar10")
    assert err.value.field == "study.datasets.cifar10.mirror"
    assert "md5" in str(err.value) and "c58f30108f718f92721af3b95e74349a" in str(err.value)
    assert_nothing_kept(root)


def test_an_interrupted_transfer_keeps_nothing_and_a_retry_succeeds(
        tmp_path: Path, mirror: Mirror, archives) -> None:
    sha256 = serve(mirror, archives)
    size = len(archives["cifar10"][0])
    root = tmp_path / "data"
    mirror.truncate = True
    with pytest.raises(ConfigError) as err:
        validate_dataset("cifar10", settings(root, mirror, sha256), "study.datasets.cifar10")
    assert f"stopped after {size // 2:,} of {size:,} bytes" in str(err.value)
    assert_nothing_kept(root)
    mirror.truncate = False
    validate_dataset("cifar10", settings(root, mirror, sha256), "study.datasets.cifar10")
    assert os.listdir(root) == ["cifar-10-batches-py"]


def test_http_errors_and_unsafe_archives_keep_nothing(tmp_path: Path, mirror: Mirror,
                                                      archives) -> None:
    root = tmp_path / "data"
    with pytest.raises(ConfigError) as err:  # nothing served
        validate_dataset("cifar10", settings(root, mirror, "ab" * 32), "study.datasets.cifar10")
    assert "HTTP 404" in str(err.value)
    assert_nothing_kept(root)
    source = tmp_path / "source"
    write_fake_cifar10(source)
    body = tar_gz(source / "cifar-10-batches-py", {"../escaped": b"x"})
    mirror.files["/cifar/cifar-10-python.tar.gz"] = body
    sha256 = hashlib.sha256(body).hexdigest()
    with pytest.raises(ConfigError) as err:
        validate_dataset("cifar10", settings(root, mirror, sha256), "study.datasets.cifar10")
    assert "unsafe member '../escaped'" in str(err.value)
    assert_nothing_kept(root)
    assert not (tmp_path / "escaped").exists()


def test_a_file_url_mirror_works_and_an_incomplete_folder_is_not_overwritten(
        tmp_path: Path, archives) -> None:
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    (shelf / "cifar-10-python.tar.gz").write_bytes(archives["cifar10"][0])
    root = tmp_path / "data"
    values = {"root": str(root), "download": True, "mirror": shelf.as_uri(),
              "sha256": archives["cifar10"][1]}
    validate_dataset("cifar10", values, "study.datasets.cifar10")
    os.remove(root / "cifar-10-batches-py" / "test_batch")
    with pytest.raises(ConfigError) as err:
        validate_dataset("cifar10", values, "study.datasets.cifar10")
    assert err.value.field == "study.datasets.cifar10.root" and "lacks test_batch" in str(err.value)
    assert sorted(os.listdir(root / "cifar-10-batches-py"))[0] == "batches.meta"


def test_without_download_missing_files_say_how_to_fetch_them(tmp_path: Path,
                                                              mirror: Mirror) -> None:
    with pytest.raises(ConfigError) as err:
        validate_dataset("cifar10", settings(tmp_path, mirror, None, download=False),
                         "study.datasets.cifar10")
    assert err.value.field == "study.datasets.cifar10.root"
    assert "data.download=true" in str(err.value)
    assert mirror.requests == []


@pytest.mark.parametrize("key, value", [("download", "yes"), ("mirror", "ftp://host/cifar"),
                                        ("sha256", "not-a-digest")])
def test_bad_download_settings_name_the_field(tmp_path: Path, key: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate_dataset("cifar10", {"root": str(tmp_path), key: value},
                         "study.datasets.cifar10", require_data=False)
    assert err.value.field == f"study.datasets.cifar10.{key}"


def test_download_settings_change_no_job_id(tmp_path: Path, mirror: Mirror, archives,
                                            study) -> None:
    sha256 = serve(mirror, archives)
    study["datasets"] = {"cifar10": settings(tmp_path, mirror, sha256)}
    fetched = expand_study(study)
    study["datasets"] = {"cifar10": {"root": str(tmp_path)}}
    plain = expand_study(study)
    assert [j.job_id for j in fetched.jobs] == [j.job_id for j in plain.jobs]
    assert all(set(j.dataset_cfg).isdisjoint({"download", "mirror", "sha256"})
               for j in fetched.jobs)
    assert len(mirror.requests) == 1  # once, although several jobs use the dataset


def test_the_kdflow_commands_download_once_and_never_in_a_dry_run(
        tmp_path: Path, mirror: Mirror, archives, capsys) -> None:
    sha256 = serve(mirror, archives)
    root = tmp_path / "data"
    args = ["data", "download", "cifar10", f"data.root={root}", f"data.mirror.url={mirror.url}",
            f"data.mirror.sha256.cifar10={sha256}"]
    assert main(args) == 0
    assert "cifar10 downloaded into" in capsys.readouterr().out
    assert main(args) == 0
    assert "already complete" in capsys.readouterr().out and len(mirror.requests) == 1
    assert main(["data", "download", "digits"]) == 2
    assert "cifar10, cifar100" in capsys.readouterr().err
    elsewhere = tmp_path / "elsewhere"
    assert main(["run", "--dry-run", "study=cifar100_benchmark", f"data.root={elsewhere}",
                 "data.download=true", f"data.mirror.url={mirror.url}",
                 f"output_dir={tmp_path / 'out'}"]) == 0
    assert len(mirror.requests) == 1 and not elsewhere.exists()
