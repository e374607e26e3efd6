"""The compile cache: a checkpoint compiled once per content and options, then reused."""

import functools
import hashlib
import json
import os
from pathlib import Path

import tvm

import relaxlm
from relaxlm.artifacts import is_artifact


def cache_root() -> Path:
    return Path(os.environ.get("RELAXLM_CACHE") or Path.home() / ".cache" / "relaxlm")


def content_key(model_path: Path, options: dict) -> str:
    """Hash of every file that shapes the artifact, plus the options and versions."""
    digest = hashlib.sha256()
    versions = {"relaxlm": relaxlm.__version__, "tvm": tvm.__version__}
    digest.update(json.dumps({**options, **versions}, sort_keys=True).encode())
    digest.update(_code_digest().encode())
    for file in _shaping_files(model_path):
        digest.update(file.name.encode())
        with open(file, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()[:24]


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


def cached_artifact(model: str | os.PathLike, **options) -> Path:
    """The artifact for `model` under the cache, compiling it first if it is not there."""
    from relaxlm.compiler.pipeline import compile_model
    from relaxlm.compiler.targets import resolve_target
    from relaxlm.frontends.checkpoint import resolve_model_path

    path = resolve_model_path(model)
    # The preset's TVM target names this CPU's features: another CPU gets another entry.
    key = content_key(path, {**options, "tvm_target": resolve_target(options["target"]).tvm_target})
    folder = cache_root() / "artifacts" / f"{path.name}-{key}"
    if not is_artifact(folder):
        compile_model(path, folder, **options)
    return folder
