"""The compile cache: a checkpoint compiled once per content and options, then reused."""

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
    files = (
        [model_path]
        if model_path.is_file()
        # sentence-transformers keeps module configs in numbered folders (1_Pooling/config.json)
        else sorted(p for p in [*model_path.iterdir(), *model_path.glob("*_*/*")] if p.is_file())
    )
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()[:24]


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
