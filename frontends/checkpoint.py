"""Hugging Face checkpoints: a local model folder, or a repo id in huggingface_hub's cache.

Mixture-of-experts checkpoints store each expert's weights apart (`P.experts.{i}.S`); a
checkpoint presents them stacked as one tensor `P.experts.S` of shape [num_experts, ...], the
layout graphs compute experts from (gathering the selected experts' rows).
"""

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from relaxlm.artifacts.safetensors_io import TensorInfo, index_file, read
from relaxlm.errors import RelaxlmError

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)


@dataclass
class Checkpoint:
    """A Hugging Face model folder: its config, its tensors (read lazily) and tokenizer files."""

    path: Path
    config: dict
    tensors: dict[str, "TensorInfo | StackedExperts"] = field(repr=False)

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        if len(archs) != 1:
            raise RelaxlmError(
                f"{self.path / 'config.json'}: 'architectures' is {archs!r}; "
                'it must name exactly one architecture, e.g. ["LlamaForCausalLM"]'
            )
        return archs[0]

    @property
    def weight_files(self) -> list[Path]:
        parts = (getattr(info, "parts", (info,)) for info in self.tensors.values())
        return sorted({part.file for group in parts for part in group})

    @property
    def tokenizer_files(self) -> list[Path]:
        return [self.path / n for n in TOKENIZER_FILES if (self.path / n).is_file()]

    @property
    def stored_types(self) -> dict[str, str]:
        """Tensor name -> the GGML type it is stored as; empty for all but GGUF files."""
        return {}

    @property
    def adapters(self) -> tuple:
        """The LoRA adapters merged into its tensors, in order (frontends/lora.py); none here."""
        return ()

    def read(self, name: str) -> np.ndarray:
        """One tensor, memory-mapped from its shard (no copy until converted)."""
        info = self.tensors[name]
        if isinstance(info, StackedExperts):
            return np.stack([read(part) for part in info.parts])
        return read(info)


@dataclass(frozen=True)
class StackedExperts:
    """Per-expert tensors `P.experts.{i}.S`, i = 0 .. E-1, read as one [E, ...] tensor."""

    parts: tuple[TensorInfo, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.parts), *self.parts[0].shape)

    @property
    def dtype(self) -> np.dtype:
        return self.parts[0].dtype


_EXPERT = re.compile(r"^(?P<head>.+\.experts)\.(?P<index>\d+)\.(?P<tail>.+)$")


def _stack_experts(tensors: dict[str, TensorInfo]) -> dict:
    """`tensors` with each complete group `P.experts.{0..E-1}.S` replaced by `P.experts.S`.

    A group with a gap in its indices, or parts of different shapes or dtypes, stays as it is
    (a graph asking for the stacked name then reports it missing).
    """
    groups: dict[str, dict[int, str]] = {}
    for name in tensors:
        if m := _EXPERT.match(name):
            groups.setdefault(f"{m['head']}.{m['tail']}", {})[int(m["index"])] = name
    out = dict(tensors)
    for stacked, members in groups.items():
        parts = tuple(tensors[members[i]] for i in range(len(members)) if i in members)
        if len(parts) != len(members) or len({(p.shape, p.dtype) for p in parts}) != 1:
            continue
        for name in members.values():
            del out[name]
        out[stacked] = StackedExperts(parts)
    return out


def resolve_model_path(source: str | os.PathLike) -> Path:
    """A local folder, .gguf or .onnx file as is; otherwise a repo id looked up through
    huggingface_hub."""
    path = Path(source).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix in (".gguf", ".onnx")):
        return path
    text = str(source)
    looks_like_repo = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if not looks_like_repo:
        raise RelaxlmError(
            f"model not found: {text!r} is neither a folder nor a Hugging Face repo id "
            "(owner/name); check the path"
        )
    return _snapshot(text)


def _snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    # Read at call time: huggingface_hub reads HF_HUB_CACHE only once, when first imported.
    cache_dir = os.environ.get("HF_HUB_CACHE")
    try:
        return Path(
            snapshot_download(
                repo_id, allow_patterns=patterns, local_files_only=offline, cache_dir=cache_dir
            )
        )
    except LocalEntryNotFoundError as e:
        why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub cannot be reached"
        raise RelaxlmError(
            f"model {repo_id!r} is not in the local Hugging Face cache and {why}; "
            f"download it on a connected machine with huggingface_hub's command "
            f"(`hf download {repo_id}`) or pass a local folder"
        ) from e
    except (HfHubHTTPError, OSError) as e:
        raise RelaxlmError(f"could not fetch {repo_id!r} from the Hugging Face Hub: {e}") from e


def load_hf_checkpoint(path: Path) -> Checkpoint:
    """Open a Hugging Face model folder and index its tensors (reads no tensor data)."""
    config_path = path / "config.json"
    if not config_path.is_file():
        raise RelaxlmError(f"{path}: no config.json; is this a Hugging Face model folder?")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise RelaxlmError(f"{config_path}: not valid JSON ({e})") from e
    return Checkpoint(path=path, config=config, tensors=_stack_experts(_index_tensors(path)))


def _index_tensors(path: Path) -> dict[str, TensorInfo]:
    index_path = path / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        files = sorted({path / f for f in weight_map.values()})
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        raise RelaxlmError(
            f"{path}: no model.safetensors or model.safetensors.index.json; "
            "relaxlm reads safetensors checkpoints (convert .bin files with transformers first)"
        )
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        if not file.is_file():
            raise RelaxlmError(f"{file}: shard listed in the index is missing")
        tensors.update(index_file(file))
    return tensors
