"""The compile cache: a checkpoint compiled once per content and options, then reused."""

import functools
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import tvm
from filelock import FileLock

import relaxlm
from relaxlm.artifacts import Manifest, is_artifact, remove_stale_work_folders
from relaxlm.errors import RelaxlmError


def cache_root() -> Path:
    return Path(os.environ.get("RELAXLM_CACHE") or Path.home() / ".cache" / "relaxlm")


@dataclass
class CacheEntry:
    """One compiled artifact in the cache, described by its manifest."""

    name: str  # the folder's name: the checkpoint's name and its content key
    path: Path
    bytes: int
    source: str  # the checkpoint it was compiled from
    options: str  # quantization, dtype and targets, e.g. "q4 float32 cpu"
    created: str


def cache_entries() -> list[CacheEntry]:
    """The artifacts in the compile cache, oldest first."""
    folder = cache_root() / "artifacts"
    remove_stale_work_folders(folder)
    entries = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if not is_artifact(path):
            continue
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        try:
            m = Manifest.read(path)
            source = m.source.get("path", "?")
            lora = [f"+lora:{Path(a.get('path', '?')).name}" for a in m.lora]
            stages = [f"{s['device']}:{s['layers'][0]}-{s['layers'][1] - 1}" for s in m.stages]
            where = [*m.targets, *([",".join(stages)] if stages else [])]
            options = " ".join([m.quantization.get("scheme", "none"), m.dtype, *where, *lora])
            created = m.created
        except RelaxlmError:  # listed all the same, so that `clear` can remove it
            source, options, created = "(damaged manifest)", "", ""
        entries.append(CacheEntry(path.name, path, size, source, options, created))
    return sorted(entries, key=lambda e: e.created)


def clear_cache(names: list[str] | None = None) -> list[CacheEntry]:
    """Delete the named cache entries (all when `names` is empty); returns what was deleted."""
    entries = cache_entries()
    if names:
        known = {e.name for e in entries}
        if unknown := [n for n in names if n not in known]:
            raise RelaxlmError(
                f"not in the compile cache: {', '.join(unknown)}; `relaxlm cache list` shows "
                "the entries"
            )
        entries = [e for e in entries if e.name in names]
    for entry in entries:
        shutil.rmtree(entry.path)
    return entries


def content_key(model_path: Path, options: dict, adapters: list[Path] = ()) -> str:
    """Hash of every file that shapes the artifact, plus the options and versions.

    adapters: LoRA adapter folders merged into the weights, in order (their config and
        tensors count, not where they lie).
    """
    digest = hashlib.sha256()
    versions = {"relaxlm": relaxlm.__version__, "tvm": tvm.__version__}
    digest.update(json.dumps({**options, **versions}, sort_keys=True).encode())
    digest.update(_code_digest().encode())
    for file in _shaping_files(model_path):
        _hash_file(digest, file.name, file)
    for i, folder in enumerate(adapters):
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            if (folder / name).is_file():  # a missing one is compile's error to report
                _hash_file(digest, f"lora {i} {name}", folder / name)
    return digest.hexdigest()[:24]


def _hash_file(digest, label: str, file: Path) -> None:
    digest.update(label.encode())
    with open(file, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)


def _shaping_files(model_path: Path) -> list[Path]:
    """The checkpoint's files: a folder's, or a file and the companions its frontend reads."""
    if model_path.suffix == ".onnx":  # external data beside it; tokenizer, pooling one up too
        above = [f for f in _folder_files(model_path.parent.parent) if f.suffix == ".json"]
        return sorted({*_folder_files(model_path.parent), *above})
    if model_path.is_file():
        return [model_path]
    return _folder_files(model_path)


def _folder_files(folder: Path) -> list[Path]:
    # sentence-transformers keeps module configs in numbered folders (1_Pooling/config.json)
    return sorted(p for p in [*folder.iterdir(), *folder.glob("*_*/*")] if p.is_file())


@functools.cache
def _code_digest() -> str:
    """Hash of the compiler's and frontends' sources: a changed compiler recompiles."""
    from relaxlm import compiler, frontends

    digest = hashlib.sha256()
    for package in (compiler, frontends):
        for file in sorted(Path(package.__file__).parent.rglob("*.py")):
            digest.update(file.read_bytes())
    return digest.hexdigest()


def cached_artifact(model: str | os.PathLike, lora: list = (), **options) -> Path:
    """The artifact for `model` (with the LoRA adapter folders `lora` merged in) under the
    cache, compiling it first if it is not there."""
    from relaxlm.compiler.pipeline import compile_model
    from relaxlm.compiler.targets import resolve_target
    from relaxlm.frontends.checkpoint import resolve_model_path

    path = resolve_model_path(model)
    adapters = [Path(a).expanduser().resolve() for a in lora]
    # The preset's TVM target names this CPU's features: another CPU gets another entry.
    tvm_target = resolve_target(options["target"]).tvm_target
    key = content_key(path, {**options, "tvm_target": tvm_target}, adapters)
    folder = cache_root() / "artifacts" / f"{path.name}-{key}"
    if is_artifact(folder):
        return folder
    # Another process compiling the same entry (a second server, a test worker) finishes first
    # and this one loads its result: neither replaces a folder the other may be reading.
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(folder.with_name(f".{folder.name}.lock")):
        if not is_artifact(folder):
            compile_model(path, folder, lora=adapters, **options)
    return folder
