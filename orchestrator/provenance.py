"""What produced a job's result: a digest of the source that defines it, kdflow's version and
git commit, and the torch / CUDA / cuDNN versions and the device it ran on.

The code digest
---------------
A job's numbers depend on a small part of kdflow's source; :func:`code_digest` covers exactly
that part, so editing ``methods/distillers/kd.py`` changes the digest of KD jobs (and of the
methods that import ``kd_loss``) but not of the student-alone or teacher jobs, and editing
``orchestrator/report.py`` changes nothing. Its inputs:

1. the roots (:func:`job_modules`): the module of the distiller class registered under
   ``spec.method``; the modules of the model builders registered under ``spec.model`` and
   ``spec.teacher``; the modules of the dataset's settings class and of the loader builder its
   ``loader`` setting selects;
2. each root closed transitively over its imports of kdflow's own modules under
   :data:`CLOSURE_SCOPE` (``methods`` and ``orchestrator.data``), parsed with ``ast`` (imports
   inside functions count). A package's ``__init__`` counts only when imported by name, not as
   the parent of an imported module: ``methods/distillers/__init__.py`` imports every method,
   and one method's edit must not change every digest;
3. the fixed list :data:`TRAINING_STEP`, the training step every job runs (not closed over its
   imports: they add the store, tracking and checkpoint files, bookkeeping that changes no
   number). ``checkpoint.py`` is left out on purpose: it writes and reads back the state the
   runner hands it, byte for byte, and a fault there fails a job loudly rather than changing
   its result; ``orchestrator/data/__init__.py`` is left out because it only registers datasets
   (adding one must not make every job stale).

The digest is the sha256 of the lines ``<path>\\0<sha256 of the file's bytes>\\n`` over those
files, with paths relative to the source root (the folder holding ``methods/`` and
``orchestrator/``) in sorted order, so the same source gives the same digest on every machine.
It is computed once per set of roots and process (files are parsed and hashed once each): a
study of 1,000 jobs has a few dozen distinct sets. Within a process the digest describes the
source as first read, which is the code that process imported.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Any, Dict, FrozenSet, Optional, Tuple

import torch

from kdflow.orchestrator.checkpoint import DIGEST_LENGTH, SEAL_LENGTH, SEAL_MAGIC
from kdflow.orchestrator.spec import JobSpec

#: The folder holding kdflow's packages (``methods/``, ``orchestrator/``...): the repository
#: root in a checkout, ``site-packages/kdflow`` in an installed copy.
SOURCE_ROOT = Path(__file__).resolve().parent.parent
#: The namespace kdflow's packages are imported under; module ``kdflow.a.b`` is ``a/b.py``.
NAMESPACE = "kdflow."
#: Imports of these packages (and their modules) are followed when closing the roots.
CLOSURE_SCOPE = ("kdflow.methods", "kdflow.orchestrator.data")
#: The training step every job runs: in every digest, not closed over its imports.
TRAINING_STEP = tuple(f"kdflow.orchestrator.{name}" for name in (
    "runner", "training", "evaluation", "recipe", "fast_path", "loss_guard", "distributed",
    "metrics"))
#: The distribution whose version is recorded (setup.cfg's ``name``).
DISTRIBUTION = "kdflow"
#: Seconds a ``git`` call may take before it is given up (the commit is then not recorded).
GIT_TIMEOUT_S = 3.0


def job_modules(spec: JobSpec) -> Tuple[str, ...]:
    """The root modules of ``spec``'s code digest (item 1 of the module docstring), sorted."""
    from kdflow.methods.distillers import DISTILLERS
    from kdflow.methods.models import MODELS
    from kdflow.orchestrator.data import DATASETS
    from kdflow.orchestrator.data.registry import DEFAULT_LOADER

    roots = {DISTILLERS.get(spec.method).__module__}
    roots |= {_defined_in(MODELS.get(name).builder) for name in (spec.model, spec.teacher) if name}
    entry = DATASETS.get(spec.dataset)
    roots.add(entry.Config.__module__)
    builder = entry.loaders.get((spec.dataset_cfg or {}).get("loader") or DEFAULT_LOADER)
    if builder is not None:
        roots.add(_defined_in(builder))
    return tuple(sorted(roots))


def _defined_in(function: Any) -> str:
    """The module ``function`` (or the function a ``functools.partial`` wraps) is defined in."""
    return getattr(function, "func", function).__module__


def code_files(spec: JobSpec, root: Path = SOURCE_ROOT) -> Dict[str, str]:
    """The files of ``spec``'s code digest under ``root``: relative path -> sha256 of its bytes."""
    return dict(closure_files(root, job_modules(spec)))


def code_digest(spec: JobSpec, root: Path = SOURCE_ROOT) -> str:
    """The sha256 (hex) of the source that defines ``spec``'s result (see the module docstring)."""
    return digest_of(code_files(spec, root))


def digest_of(files: Dict[str, str]) -> str:
    """The code digest of ``files`` (relative path -> sha256 of its bytes)."""
    lines = "".join(f"{path}\0{files[path]}\n" for path in sorted(files))
    return hashlib.sha256(lines.encode()).hexdigest()


def forget_cached_digests() -> None:
    """Drop what this process has read and hashed (for a caller that edits the source)."""
    for cached in (closure_files, _imports, _file_sha256, _module_file):
        cached.cache_clear()


@functools.lru_cache(maxsize=None)
def closure_files(root: Path, roots: Tuple[str, ...]) -> Tuple[Tuple[str, str], ...]:
    """(path relative to ``root``, sha256 of its bytes) of each module in the closure of the
    modules ``roots`` (items 2 and 3 of the module docstring), sorted by path; computed once
    per ``(root, roots)`` in a process."""
    seen: set = set()
    todo = list(roots)
    while todo:
        module = todo.pop()
        if module in seen or _module_file(root, module) is None:
            continue
        seen.add(module)
        todo.extend(_imports(root, module))
    paths = {_module_file(root, m) for m in (*seen, *TRAINING_STEP)} - {None}
    return tuple(sorted((path, _file_sha256(root / path)) for path in paths))


@functools.lru_cache(maxsize=None)
def _module_file(root: Path, module: str) -> Optional[str]:
    """The path of ``module``'s source relative to ``root`` (its ``__init__.py`` for a
    package); None when it is not a source file there (not kdflow's own)."""
    if not module.startswith(NAMESPACE):
        return None
    base = module[len(NAMESPACE):].replace(".", "/")
    for relative in (f"{base}.py", f"{base}/__init__.py"):
        if (root / relative).is_file():
            return relative
    return None


def _in_scope(module: str) -> bool:
    return any(module == scope or module.startswith(scope + ".") for scope in CLOSURE_SCOPE)


@functools.lru_cache(maxsize=None)
def _imports(root: Path, module: str) -> FrozenSet[str]:
    """The modules under :data:`CLOSURE_SCOPE` that ``module``'s source imports anywhere in it.

    ``from package import name`` is the submodule ``package.name`` when that is a file, else
    the package itself; relative imports are resolved against ``module``'s package.
    """
    relative = _module_file(root, module)
    tree = ast.parse((root / relative).read_bytes(), filename=relative)
    package = module.split(".") if relative.endswith("__init__.py") else module.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = package[:len(package) - node.level + 1] if node.level else []
            base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if _module_file(root, submodule) else base)
    return frozenset(name for name in found if name and _in_scope(name))


@functools.lru_cache(maxsize=None)
def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def weights_fingerprint(path: Path) -> Optional[str]:
    """The sha256 a sealed weights file (``model.pt``, :mod:`orchestrator.checkpoint`) carries
    in its zip comment, read from its last bytes; for a file written before files were sealed,
    the sha256 of its bytes; None when there is no file."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            if f.tell() >= SEAL_LENGTH:
                f.seek(-SEAL_LENGTH, 2)
                tail = f.read()
                if tail[:-DIGEST_LENGTH] == SEAL_MAGIC:
                    return tail[-DIGEST_LENGTH:].decode("ascii", errors="replace")
            f.seek(0)
            return hashlib.sha256(f.read()).hexdigest()
    except FileNotFoundError:
        return None


@functools.lru_cache(maxsize=None)
def kdflow_version() -> Optional[str]:
    """The installed kdflow distribution's version; None when it is not installed."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=None)
def git_state(root: Path = SOURCE_ROOT) -> Tuple[Optional[str], Optional[bool]]:
    """(commit, dirty) of the git checkout kdflow's source lives in: dirty when tracked files
    differ from the commit (as ``git describe --dirty``). (None, None) when ``root`` is not in
    a checkout that tracks kdflow (an installed copy, a venv inside some repository), or git
    is missing or slow: this never fails a job."""
    tracked = _git(root, "ls-files", "--error-unmatch", "--", "orchestrator/__init__.py")
    commit = _git(root, "rev-parse", "HEAD") if tracked is not None else None
    changes = _git(root, "status", "--porcelain", "--untracked-files=no") if commit else None
    if commit is None or changes is None:
        return None, None
    return commit.strip(), bool(changes.strip())


def _git(root: Path, *args: str) -> Optional[str]:
    """``git -C root ARGS``'s output; None if it fails, is missing or takes too long."""
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=GIT_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def device_name(device: torch.device) -> str:
    """The accelerator's name (``NVIDIA H200``), or ``cpu (<machine>)``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()})"


def job_provenance(spec: JobSpec, device: torch.device,
                   teacher_weights: Optional[str]) -> Dict[str, Any]:
    """The ``provenance`` record of ``result.json`` for ``spec`` running on ``device`` now.

    teacher_weights: :func:`weights_fingerprint` of the teacher weights the job read (None: it
    reads none).
    """
    files = code_files(spec)
    commit, dirty = git_state()
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "kdflow_version": kdflow_version(), "git_commit": commit, "git_dirty": dirty,
        "code_digest": digest_of(files), "code_files": files,
        "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "cudnn": cudnn, "device": device_name(device),
        "teacher_weights": teacher_weights,
    }


#: MLflow tag -> provenance key. ``mlflow.source.git.commit`` is the tag MLflow's UI shows.
TAGS = {"kdflow.version": "kdflow_version", "kdflow.git_commit": "git_commit",
        "mlflow.source.git.commit": "git_commit", "kdflow.git_dirty": "git_dirty",
        "kdflow.code_digest": "code_digest", "kdflow.python": "python", "kdflow.torch": "torch",
        "kdflow.cuda": "cuda", "kdflow.cudnn": "cudnn", "kdflow.device_name": "device",
        "kdflow.teacher_weights": "teacher_weights"}


def provenance_tags(record: Dict[str, Any]) -> Dict[str, str]:
    """The MLflow tags of a provenance record (values that are None are left out)."""
    return {tag: str(record[key]) for tag, key in TAGS.items() if record.get(key) is not None}
