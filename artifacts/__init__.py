"""The artifact: a folder the compiler writes and the runtime loads.

    manifest.json          the contract (see Manifest); written last
    weights/shard-N.safetensors   target-independent weights, in the graph's parameter order
    lib/<target>.so|.tar   one compiled library per target (cpu.so, cuda.so, metal.tar, ...)
    lib/stage<k>-<target>.so   instead, for a model split across devices: one per stage
    tokenizer/             tokenizer.json, tokenizer_config.json, generation_config.json, ...

Writes are atomic: everything goes to a hidden sibling folder that is renamed into place
only when complete, so a killed compile never leaves a folder that looks like an artifact.
"""

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from relaxlm.errors import RelaxlmError

from .safetensors_io import DTYPE_NAMES, ShardWriter, TensorInfo, index_file
from .schema import manifest_problems, param_problems

FORMAT = "relaxlm-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_BYTES = 1 << 30
CREATED_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # UTC


@dataclass
class Manifest:
    """Everything the runtime needs to load and run the model; it never guesses."""

    relaxlm_version: str
    tvm_version: str
    architecture: str
    model_config: dict[str, Any]  # the checkpoint's config.json
    dtype: str
    quantization: dict[str, Any]
    context_window: int
    prefill_chunk_size: int
    vocab_size: int
    kv_cache: dict[str, Any]  # layout of the paged KV cache the library creates
    params: list[dict[str, Any]]  # {name, shape, dtype, shard} in the graph's packed order
    shards: dict[str, dict[str, Any]]  # file -> {size, sha256}
    # preset -> {library, size, sha256, tvm_target, device, archs (CUDA)}; `device` is the
    # runtime device kind that loads the library (the preset's name where absent)
    targets: dict[str, dict[str, Any]]
    tokenizer: dict[str, Any]  # {files: [...]}
    source: dict[str, Any] = field(default_factory=dict)  # where the checkpoint came from
    # "generate": prefill/decode entries over the paged KV cache; "embed": one `embed` entry,
    # no KV cache (kv_cache is empty), pooling described by `embedding`.
    task: str = "generate"
    embedding: dict[str, Any] = field(default_factory=dict)  # {pooling, normalize, ...}
    # LoRA adapters merged into the weights at compile time, in order: {path, sha256 (of
    # adapter_model.safetensors), r, alpha, target_modules, ...}; absent before they existed.
    lora: list[dict[str, Any]] = field(default_factory=list)
    # Adapter slots served unmerged (frontends/lora_slots.py, runtime/lora.py): {slots,
    # max_rank, targets: {module: {in, out, A, B}}}; empty: none.
    lora_slots: dict[str, Any] = field(default_factory=dict)
    # Vision-language models: the image preprocessing and image token (runtime/vision.py);
    # empty for text models.
    vision: dict[str, Any] = field(default_factory=dict)
    # Speech models (task "transcribe"): audio features and special tokens (runtime/whisper.py).
    speech: dict[str, Any] = field(default_factory=dict)
    # A model split across devices (artifacts/device_map.py), in layer order, `targets` then
    # empty: {device ("cuda:0"), layers [first, end), target (preset), library, size, sha256,
    # tvm_target, archs (CUDA), params (names in manifest.params, in the library's order),
    # kv_cache (the stage's own cache layout)}. Empty for a model on one device.
    stages: list[dict[str, Any]] = field(default_factory=list)
    # A model split into tensor-parallel shards (frontends/tensor_parallel.py), run by TVM Disco
    # (runtime/tensor_parallel.py): {shards, split ({parameter: axis} of the checkpoint's
    # weights cut in rank order), allreduce (the modules summed over shards), workers (per
    # shard, its weights' names in manifest.params, in the library's order)}; kv_cache is one
    # shard's. Empty for an unsharded model.
    tensor_parallel: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    created: str = field(default_factory=lambda: time.strftime(CREATED_FORMAT, time.gmtime()))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    @staticmethod
    def read(folder: str | os.PathLike) -> "Manifest":
        """The manifest of an artifact folder, checked for format and version."""
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise RelaxlmError(f"{folder}: not a relaxlm artifact (no {MANIFEST})")
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RelaxlmError(f"{path}: not valid JSON ({e}); recompile the model") from e
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            kind = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise RelaxlmError(f"{path}: not a relaxlm manifest (format {kind!r})")
        if data.get("format_version") != FORMAT_VERSION:
            raise RelaxlmError(
                f"{path}: artifact format version {data.get('format_version')!r}, but this "
                f"relaxlm reads version {FORMAT_VERSION}; recompile the model with this relaxlm"
            )
        if problems := manifest_problems(data):
            raise RelaxlmError(
                f"{path}: damaged manifest ({'; '.join(problems)}); recompile the model"
            )
        try:
            return Manifest(**data)
        except TypeError as e:
            raise RelaxlmError(f"{path}: manifest fields do not match ({e}); recompile") from e


def is_artifact(folder: str | os.PathLike) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


# Hidden work folders beside an artifact: `.NAME.partial-PID-XXXX` while it is written,
# `.NAME.old-PID` for the artifact it replaces. The PID tells whether their owner still runs.
_WORK_FOLDER = re.compile(r"^\..+\.(partial|old)-(\d+)(-\w+)?$")
_LEGACY_PARTIAL = re.compile(r"^\..+\.partial-\w+$")  # before the PID was in the name
_LEGACY_AGE_S = 3600


def remove_stale_work_folders(folder: str | os.PathLike) -> list[Path]:
    """Delete the work folders in `folder` that killed compiles left behind; returns them.

    A folder whose process is gone is stale (nothing is lost: a partial folder only becomes an
    artifact through its own process); one named before PIDs were recorded, once an hour old.
    """
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        if not path.is_dir():
            continue
        if match := _WORK_FOLDER.match(path.name):
            stale = not _process_alive(int(match[2]))
        elif _LEGACY_PARTIAL.match(path.name):
            stale = time.time() - path.stat().st_mtime > _LEGACY_AGE_S
        else:
            continue
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class ArtifactWriter:
    """Builds an artifact in a hidden temporary folder and renames it into place on commit."""

    def __init__(self, output: str | os.PathLike):
        self.output = Path(output).resolve()
        self.output.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_work_folders(self.output.parent)
        self.tmp = Path(
            tempfile.mkdtemp(
                prefix=f".{self.output.name}.partial-{os.getpid()}-", dir=self.output.parent
            )
        )
        self.params: list[dict[str, Any]] = []
        self.shards: dict[str, dict[str, Any]] = {}
        self.targets: dict[str, dict[str, Any]] = {}
        self.stages: list[dict[str, Any]] = []
        self.tokenizer_files: list[str] = []
        self.base: tuple[Path, Manifest] | None = None  # see keep_libraries

    def __enter__(self) -> "ArtifactWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.tmp.exists():  # not committed: an error or an interrupt
            shutil.rmtree(self.tmp, ignore_errors=True)

    def write_weights(self, layout: list[tuple[str, tuple[int, ...], np.dtype]], arrays) -> None:
        """Stream `arrays` (an iterable of (name, array) in `layout` order) into shards."""
        (self.tmp / "weights").mkdir()
        groups, size = [[]], 0
        for entry in layout:
            nbytes = int(np.prod(entry[1], dtype=np.int64)) * np.dtype(entry[2]).itemsize
            if groups[-1] and size + nbytes > SHARD_BYTES:
                groups.append([])
                size = 0
            groups[-1].append(entry)
            size += nbytes
        arrays = iter(arrays)
        for i, group in enumerate(groups):
            rel = f"weights/shard-{i:03d}.safetensors"
            writer = ShardWriter(self.tmp / rel, group)
            for name, shape, dtype in group:
                got_name, array = next(arrays)
                writer.write(got_name, array)
                self.params.append(
                    {
                        "name": name,
                        "shape": list(shape),
                        "dtype": DTYPE_NAMES[np.dtype(dtype)],
                        "shard": rel,
                    }
                )
            writer.close()
            path = self.tmp / rel
            self.shards[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}

    def add_library(
        self, preset: str, library: Path, tvm_target: dict[str, Any], **extra: Any
    ) -> None:
        """Copy in the library for target `preset`; `extra` (device, archs) goes in its entry."""
        (self.tmp / "lib").mkdir(exist_ok=True)
        rel = f"lib/{preset}{library.suffix}"
        shutil.copyfile(library, self.tmp / rel)
        self.targets[preset] = {
            "library": rel,
            "size": (self.tmp / rel).stat().st_size,
            "sha256": sha256_file(self.tmp / rel),
            "tvm_target": tvm_target,
            **extra,
        }

    def add_stage(
        self, preset: str, library: Path, tvm_target: dict[str, Any], **entry: Any
    ) -> None:
        """Copy in the library of the next pipeline stage; `entry` (device, layers, params,
        kv_cache, ...) goes in its manifest entry."""
        (self.tmp / "lib").mkdir(exist_ok=True)
        rel = f"lib/stage{len(self.stages)}-{preset}{library.suffix}"
        shutil.copyfile(library, self.tmp / rel)
        self.stages.append(
            {
                **entry,
                "target": preset,
                "library": rel,
                "size": (self.tmp / rel).stat().st_size,
                "sha256": sha256_file(self.tmp / rel),
                "tvm_target": tvm_target,
            }
        )

    def keep_libraries(self, folder: str | os.PathLike) -> None:
        """Carry over the libraries of the artifact at `folder` (a library added later for the
        same target replaces its own); commit checks that the weights written are that
        artifact's, byte for byte, so every library still fits them."""
        folder = Path(folder)
        manifest = Manifest.read(folder)
        verify(folder, manifest)
        (self.tmp / "lib").mkdir(exist_ok=True)
        for name, entry in manifest.targets.items():
            shutil.copyfile(folder / entry["library"], self.tmp / entry["library"])
            self.targets[name] = dict(entry)
        self.base = (folder, manifest)

    def add_tokenizer(self, files: list[Path]) -> None:
        (self.tmp / "tokenizer").mkdir(exist_ok=True)
        for file in files:
            shutil.copyfile(file, self.tmp / "tokenizer" / file.name)
            self.tokenizer_files.append(f"tokenizer/{file.name}")

    def commit(self, manifest: Manifest) -> Path:
        """Write the manifest last, then move the folder into place (replacing an old one).

        `manifest` lists what this writer wrote (its params, shards, targets, tokenizer files).
        """
        if self.base is not None:
            folder, base = self.base
            if (base.params, base.shards) != (self.params, self.shards):
                raise RelaxlmError(
                    f"{folder}: its weights differ from the ones just compiled (another "
                    "checkpoint, --quant, --dtype or --lora), so its libraries would not fit them; "
                    "compile all targets with the same options, or write a new artifact"
                )
        (self.tmp / MANIFEST).write_text(manifest.to_json())
        if self.output.exists():
            old = self.output.with_name(f".{self.output.name}.old-{os.getpid()}")
            os.rename(self.output, old)
            os.rename(self.tmp, self.output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.tmp, self.output)
        return self.output


def check_files(folder: Path, manifest: Manifest) -> None:
    """The check at every load, cheap at any size: each file the manifest names is there with
    its recorded size. Headers are checked as weight_index reads them; verify() hashes."""
    for rel, meta in _files(manifest).items():
        path = folder / rel
        if not path.is_file():
            raise RelaxlmError(f"{folder}: artifact file {rel} is missing; recompile the model")
        size = path.stat().st_size
        if size != meta["size"]:
            raise RelaxlmError(
                f"{folder}: {rel} is {size} bytes, but the manifest records {meta['size']}; "
                "the file is damaged, recompile the model"
            )


def verify(folder: Path, manifest: Manifest) -> None:
    """Check every file the manifest names against its size, then its SHA-256 (seconds per GB:
    `relaxlm inspect --verify`, compile and tests, not every load)."""
    check_files(folder, manifest)
    for rel, meta in _files(manifest).items():
        if sha256_file(folder / rel) != meta["sha256"]:
            raise RelaxlmError(f"{folder}: {rel} does not match its checksum; recompile the model")


def _files(manifest: Manifest) -> dict[str, dict[str, Any]]:
    """Every file the manifest records -> its entry ({size, sha256, ...})."""
    libraries = [*manifest.targets.values(), *manifest.stages]
    return {**manifest.shards, **{t["library"]: t for t in libraries}}


def weight_index(folder: Path, manifest: Manifest) -> dict[str, TensorInfo]:
    """Where each parameter lies in the artifact's shards; RelaxlmError if a shard's header is
    damaged or disagrees with the manifest's parameter list."""
    index: dict[str, TensorInfo] = {}
    for rel in manifest.shards:
        index.update(index_file(folder / rel))
    if problems := param_problems(manifest.params, list(manifest.shards), index):
        raise RelaxlmError(
            f"{folder}: weights do not match the manifest ({'; '.join(problems)}); "
            "recompile the model"
        )
    return index
