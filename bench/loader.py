"""Training-loader throughput: kdflow's FFCV loader against torchvision's, on one JPEG set.

What is measured: images per second of one training epoch of ``imagefolder`` batches (batch 64,
``--workers`` decoding workers, CPU), built by kdflow's ``build_data`` so both loaders apply
kdflow's real training transforms (RandomResizedCrop 224, horizontal flip, ImageNet
normalisation) and yield the same ``Batch(x (B, 3, 224, 224) float32, y, index)``:

* ``torchvision``: ImageFolder + PIL decoding in ``--workers`` DataLoader processes
  (``data.loader=torchvision``);
* ``ffcv (jpg)``: .beton files written by ``kdflow data prepare`` with ``write_mode=jpg``, so
  every image is JPEG-decoded on both sides (the fair comparison), read by ``--workers`` FFCV
  (numba) threads (``data.loader=ffcv``);
* ``ffcv (proportion)``, an extra row (``--no-proportion`` skips it): FFCV's ImageNet recipe,
  ``write_mode=proportion``, where half the images are stored as raw pixels and need no decoding.

The images are generated once into ``--data`` (reused when complete): an ImageFolder tree of
``--classes`` x ``--train-per-class`` training and ``--classes`` x ``--val-per-class``
validation JPEGs (quality 90) of random sizes 300-500 px per side, smooth random colour
gradients with blocks of noise and pixel noise (about 80 KiB each, not trivially compressible).
The .beton files are written by kdflow's ``prepare`` (timed when written; splits already
written with the same settings are kept, ``--rewrite`` writes them again).

How: each loader is built, then epoch 0 is run in full as a warm-up (for FFCV it includes the
numba compilation; its time to the first batch is reported too), then epoch 1 is timed with
``time.perf_counter``; images/s = images of epoch 1 / its seconds. CPU seconds of the process
and its reaped children (the DataLoader workers) during epoch 1 are recorded as well.

Target (the FFCV issue): FFCV at least 3x torchvision's images/s, same machine, same workers.
A markdown table is printed and a JSON record written (``--out``, default
``bench/results/loader-<date>.json``; ``--quick``: in the data folder).

    .venv/bin/python bench/loader.py                 # 5,000 training images, 2 workers
    .venv/bin/python bench/loader.py --workers 4 --batch-size 128
    .venv/bin/python bench/loader.py --quick         # 500 images, to test the script
"""
from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kdflow.orchestrator.data import build_data, validate_dataset  # noqa: E402
from kdflow.orchestrator.data.beton import beton_path  # noqa: E402
from kdflow.orchestrator.data.prepare import image_settings, prepare  # noqa: E402
from step import cpu_model  # noqa: E402  (bench/ is the script's folder, first on sys.path)

DATASET = "imagefolder"
IMAGE_SIZE = 224
MIN_SIDE, MAX_SIDE = 300, 500
JPEG_QUALITY = 90
PIXEL_NOISE = 12.0
"""Standard deviation of the per-pixel noise added to every generated image (0-255 scale)."""
TARGET_RATIO = 3.0
BASELINE = "torchvision"
DEFAULT_DATA = Path("/tmp/kdflow-bench-loader")
QUICK_DATA = Path("/tmp/kdflow-bench-loader-quick")
RESULTS_DIR = REPO / "bench" / "results"
SPLIT_IDS = {"train": 0, "val": 1}


@dataclass(frozen=True)
class Tree:
    """The generated ImageFolder tree: ``root/<split>/class<c>/<i>.jpg``."""

    root: Path
    classes: int
    train_per_class: int
    val_per_class: int
    seed: int

    def per_class(self, split: str) -> int:
        return self.train_per_class if split == "train" else self.val_per_class


@dataclass
class PrepareRow:
    """One ``prepare`` call: both splits written (or kept) with ``write_mode``."""

    write_mode: str
    beton_dir: str
    written: bool
    images: int
    seconds: float | None
    images_per_s: float | None
    train_mib: float
    val_mib: float


@dataclass
class Row:
    """One loader's measurement; seconds are wall-clock, ``ratio`` is images/s over
    torchvision's (None without that row)."""

    loader: str
    images: int
    seconds: float
    images_per_s: float
    ratio: float | None
    first_batch_s: float
    warmup_epoch_s: float
    build_s: float
    cpu_s: float
    cpu_utilisation: float
    torch_threads: int


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None,
                   help=f"folder of the generated images and .beton files "
                        f"(default {DEFAULT_DATA}; --quick: {QUICK_DATA})")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=None,
                   help="training images per class (500; --quick: 50)")
    p.add_argument("--val-per-class", type=int, default=None,
                   help="validation images per class (20; --quick: 5)")
    p.add_argument("--workers", type=int, default=2,
                   help="DataLoader processes / FFCV threads, also prepare's writers")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="image generation and loader seed")
    p.add_argument("--no-proportion", action="store_true",
                   help="skip the extra ffcv (proportion) row")
    p.add_argument("--rewrite", action="store_true",
                   help="write the .beton files again even when already written")
    p.add_argument("--quick", action="store_true",
                   help="10 x 50 training images in their own folder, JSON written there")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default: bench/results/loader-<date>.json; "
                        "--quick: <data>/loader-quick.json)")
    return p.parse_args(argv)


def make_tree_spec(args: argparse.Namespace) -> Tree:
    """The tree the flags ask for, with the ``--quick`` defaults filled in."""
    root = args.data or (QUICK_DATA if args.quick else DEFAULT_DATA)
    train = args.train_per_class or (50 if args.quick else 500)
    val = args.val_per_class or (5 if args.quick else 20)
    return Tree(root=root, classes=args.classes, train_per_class=train, val_per_class=val,
                seed=args.seed)


def synth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """An (height, width, 3) uint8 image: a random colour gradient and sinusoid, 3-8 blocks of
    uniform noise and Gaussian pixel noise of ``PIXEL_NOISE``."""
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    a, b, c = (rng.uniform(-1, 1, 3).astype(np.float32) for _ in range(3))
    freq = rng.uniform(1, 6, 2).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 3).astype(np.float32)
    image = 128 + 60 * (a + b * x + c * y) + 50 * np.sin(2 * np.pi * (freq[0] * x + freq[1] * y)
                                                         + phase)
    for _ in range(rng.integers(3, 9)):
        bh, bw = rng.integers(16, height // 3), rng.integers(16, width // 3)
        top, left = rng.integers(0, height - bh), rng.integers(0, width - bw)
        image[top:top + bh, left:left + bw] = rng.integers(0, 256, (bh, bw, 3), dtype=np.uint8)
    image += rng.standard_normal((height, width, 3), dtype=np.float32) * PIXEL_NOISE
    return np.clip(image, 0, 255).astype(np.uint8)


def write_jpeg(task: tuple[str, tuple[int, ...]]) -> None:
    """Generate the image of seed ``parts`` and save it as a JPEG at ``path`` (atomically)."""
    path, parts = task
    rng = np.random.default_rng(list(parts))
    height, width = (int(s) for s in rng.integers(MIN_SIDE, MAX_SIDE + 1, 2))
    partial = path + ".partial"
    Image.fromarray(synth_image(rng, height, width)).save(partial, "JPEG", quality=JPEG_QUALITY)
    os.replace(partial, path)


def planned_files(tree: Tree) -> list[tuple[str, tuple[int, ...]]]:
    """Every image of the tree as (path, seed parts); creates the class folders."""
    files = []
    for split, split_id in SPLIT_IDS.items():
        for c in range(tree.classes):
            folder = tree.root / split / f"class{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(tree.per_class(split)):
                files.append((str(folder / f"{i:05d}.jpg"), (tree.seed, split_id, c, i)))
    return files


def check_no_extra_files(tree: Tree, planned: list[tuple[str, tuple[int, ...]]]) -> None:
    """Exit if the tree holds class folders or images it should not (another size's tree);
    removes the ``.partial`` files an interrupted generation left."""
    wanted = {path for path, _ in planned}
    for split in SPLIT_IDS:
        for folder in (tree.root / split).iterdir():
            for path in folder.iterdir() if folder.is_dir() else [folder]:
                if path.name.endswith(".partial"):
                    path.unlink()
                elif str(path) not in wanted:
                    sys.exit(f"{path} is not part of the requested tree ({tree.classes} classes "
                             f"x {tree.train_per_class} + {tree.val_per_class}): pass another "
                             "--data or remove the folder")


def generate(tree: Tree, processes: int) -> float:
    """Write the images of ``tree`` that are missing, on ``processes`` processes; seconds."""
    planned = planned_files(tree)
    check_no_extra_files(tree, planned)
    missing = [task for task in planned if not os.path.exists(task[0])]
    started = time.perf_counter()
    if missing:
        with multiprocessing.get_context("fork").Pool(max(1, processes)) as pool:
            for _ in tqdm(pool.imap_unordered(write_jpeg, missing, chunksize=16),
                          total=len(missing), desc="generating JPEGs", unit="img"):
                pass
    return time.perf_counter() - started


def tree_stats(tree: Tree) -> dict[str, Any]:
    """Files, total MiB, mean KiB per file and mean pixels per image of each split."""
    stats: dict[str, Any] = {}
    for split in SPLIT_IDS:
        paths = sorted((tree.root / split).glob("*/*.jpg"))
        sizes = [p.stat().st_size for p in paths]
        pixels = []
        for p in paths:
            with Image.open(p) as image:
                pixels.append(image.width * image.height)
        stats[split] = {"files": len(paths), "mib": sum(sizes) / 2**20,
                        "mean_kib": float(np.mean(sizes)) / 1024,
                        "mean_pixels": float(np.mean(pixels))}
    return stats


def loader_settings(tree: Tree, loader: str, workers: int, beton_dir: str) -> dict[str, Any]:
    """The ``imagefolder`` dataset settings of the tree read by ``loader``."""
    settings: dict[str, Any] = {"root": str(tree.root), "loader": loader,
                                "image_size": IMAGE_SIZE, "workers": workers}
    if beton_dir:
        settings["beton_dir"] = beton_dir
    return settings


def beton_identity(folder: str) -> tuple[tuple[int, int] | None, ...]:
    """(inode, mtime ns) of each split's .beton in ``folder`` (None when absent)."""
    identity = []
    for split in SPLIT_IDS:
        path = beton_path(folder, split)
        st = os.stat(path) if os.path.exists(path) else None
        identity.append((st.st_ino, st.st_mtime_ns) if st else None)
    return tuple(identity)


def write_betons(tree: Tree, write_mode: str, beton_dir: str, workers: int,
                 rewrite: bool) -> PrepareRow:
    """Write both splits with kdflow's ``prepare`` (longest side 500); timed when written."""
    cfg = validate_dataset(DATASET, loader_settings(tree, "torchvision", workers, beton_dir),
                           "bench")
    folder = cfg.betons()
    before = beton_identity(folder)
    started = time.perf_counter()
    prepare(DATASET, cfg, image_settings(DATASET, {"write_mode": write_mode, "max_side": 500}),
            workers=workers, force=rewrite)
    seconds = time.perf_counter() - started
    written = beton_identity(folder) != before
    images = tree.classes * (tree.train_per_class + tree.val_per_class)
    mib = [os.path.getsize(beton_path(folder, split)) / 2**20 for split in SPLIT_IDS]
    return PrepareRow(write_mode=write_mode, beton_dir=folder, written=written, images=images,
                      seconds=seconds if written else None,
                      images_per_s=images / seconds if written else None,
                      train_mib=mib[0], val_mib=mib[1])


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its reaped children so far."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_epoch(batches: Iterator[Any], images: int, desc: str) -> tuple[int, float, float]:
    """Consume an epoch's batches; (images seen, seconds, seconds to the first batch)."""
    seen, first = 0, None
    started = time.perf_counter()
    with tqdm(total=images, desc=desc, unit="img", leave=False) as bar:
        for batch in batches:
            if first is None:
                first = time.perf_counter() - started
                expected = (IMAGE_SIZE, IMAGE_SIZE)
                if batch.x.dtype != torch.float32 or tuple(batch.x.shape[1:]) != (3, *expected):
                    raise RuntimeError(f"{desc}: unexpected batch {batch.x.dtype} "
                                       f"{tuple(batch.x.shape)}")
            seen += batch.x.shape[0]
            bar.update(batch.x.shape[0])
    return seen, time.perf_counter() - started, first or 0.0


def measure(name: str, settings: dict[str, Any], batch_size: int, seed: int,
            device: str = "cpu") -> Row:
    """Build the loader for ``device``, run epoch 0 as warm-up, time epoch 1.

    ``device="meta"`` stands in for an accelerator: what the loader does on the device (FFCV's
    normalisation of the uint8 batch) costs no CPU time, as on a GPU.
    """
    gc.collect()
    started = time.perf_counter()
    data = build_data(DATASET, settings, "bench", batch_size, seed, torch.device(device))
    build_s = time.perf_counter() - started
    total = data.info.num_samples
    _, warmup_s, first_s = run_epoch(data.train.batches(0), total, f"{name} warm-up")
    cpu_before = cpu_seconds()
    images, seconds, _ = run_epoch(data.train.batches(1), total, f"{name} timed")
    cpu_s = cpu_seconds() - cpu_before
    del data
    return Row(loader=name, images=images, seconds=seconds, images_per_s=images / seconds,
               ratio=None, first_batch_s=first_s, warmup_epoch_s=warmup_s, build_s=build_s,
               cpu_s=cpu_s, cpu_utilisation=cpu_s / seconds,
               torch_threads=torch.get_num_threads())


def add_ratios(rows: list[Row]) -> None:
    base = next((r for r in rows if r.loader == BASELINE), None)
    for r in rows:
        r.ratio = r.images_per_s / base.images_per_s if base is not None else None


def versions() -> dict[str, str]:
    """Python's and the installed distributions' versions (ffcv's module says 0.0.3rc1)."""
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("torchvision", "ffcv", "numba", "pillow", "numpy", "opencv-python"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def prepare_table(rows: list[PrepareRow]) -> str:
    lines = ["| .beton write_mode | images | seconds | images/s | train MiB | val MiB |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        seconds = f"{r.seconds:.1f}" if r.seconds is not None else "kept"
        rate = f"{r.images_per_s:,.0f}" if r.images_per_s is not None else "-"
        lines.append(f"| {r.write_mode} | {r.images:,} | {seconds} | {rate} | "
                     f"{r.train_mib:,.1f} | {r.val_mib:,.1f} |")
    return "\n".join(lines)


def loader_table(rows: list[Row]) -> str:
    header = ("| loader | images | seconds | images/s | ratio to torchvision | warm-up epoch s "
              "| first batch s | CPU utilisation |")
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
        lines.append(f"| {r.loader} | {r.images:,} | {r.seconds:.2f} | {r.images_per_s:,.1f} | "
                     f"{ratio} | {r.warmup_epoch_s:.2f} | {r.first_batch_s:.2f} | "
                     f"{r.cpu_utilisation:.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    tree = make_tree_spec(args)
    torch_threads_at_start = torch.get_num_threads()
    load_before = os.getloadavg()[0]
    generate_s = generate(tree, args.workers)
    stats = tree_stats(tree)

    proportion_dir = str(tree.root / "ffcv" / f"{DATASET}-proportion")
    variants = [("ffcv (jpg)", "jpg", "")]
    if not args.no_proportion:
        variants.append(("ffcv (proportion)", "proportion", proportion_dir))
    prepared = [write_betons(tree, mode, beton_dir, args.workers, args.rewrite)
                for _, mode, beton_dir in variants]

    rows = [measure(BASELINE, loader_settings(tree, "torchvision", args.workers, ""),
                    args.batch_size, args.seed)]
    rows += [measure(name, loader_settings(tree, "ffcv", args.workers, beton_dir),
                     args.batch_size, args.seed) for name, _, beton_dir in variants]
    add_ratios(rows)
    device_rows = [measure(f"{name}, device=meta", loader_settings(tree, loader, args.workers,
                                                                   beton_dir),
                           args.batch_size, args.seed, "meta")
                   for name, loader, beton_dir in [(BASELINE, "torchvision", ""),
                                                   *[(n, "ffcv", d) for n, _, d in variants]]]
    for row in device_rows:
        row.ratio = row.images_per_s / device_rows[0].images_per_s

    import numba

    now = datetime.now().astimezone()
    fair = next(r for r in rows if r.loader == "ffcv (jpg)")
    record = {
        "benchmark": "loader",
        "date": now.isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "versions": versions(),
        "torch_threads_at_start": torch_threads_at_start,
        "numba_threads": numba.get_num_threads(),
        "load_avg_1m_before": load_before,
        "settings": {"workers": args.workers, "batch_size": args.batch_size, "seed": args.seed,
                     "image_size": IMAGE_SIZE, "classes": tree.classes,
                     "train_per_class": tree.train_per_class, "val_per_class": tree.val_per_class,
                     "source_sides_px": [MIN_SIDE, MAX_SIDE], "source_jpeg_quality": JPEG_QUALITY,
                     "data": str(tree.root)},
        "images": stats,
        "generate_s": generate_s,
        "prepare": [asdict(p) for p in prepared],
        "rows": [asdict(r) for r in rows],
        "accelerator_rows": [asdict(r) for r in device_rows],
        "target_ratio": TARGET_RATIO,
        "ffcv_jpg_ratio": fair.ratio,
        "target_met": fair.ratio is not None and fair.ratio >= TARGET_RATIO,
    }
    default = tree.root / "loader-quick.json" if args.quick else \
        RESULTS_DIR / f"loader-{now.date().isoformat()}.json"
    out = args.out or default
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")

    train = stats["train"]
    print(f"\n{train['files']:,} training JPEGs ({train['mean_kib']:.0f} KiB, "
          f"{train['mean_pixels'] / 1e3:.0f} kpx mean), batch {args.batch_size}, "
          f"{args.workers} workers, {os.cpu_count()} CPUs ({record['cpu']}), "
          f"torch threads {rows[-1].torch_threads}, numba threads {record['numba_threads']}\n")
    print(prepare_table(prepared) + "\n")
    print(loader_table(rows))
    print("\nAs an accelerator run sees it (device=meta: the batch's normalisation on the device "
          "costs no CPU):\n")
    print(loader_table(device_rows))
    print(f"\nffcv (jpg) / torchvision: {fair.ratio:.2f}x (target {TARGET_RATIO:.0f}x: "
          f"{'met' if record['target_met'] else 'not met'})")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
