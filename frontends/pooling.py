"""sentence-transformers pooling: its config files read, its pooling modes as graph ops.

The folder's `modules.json` lists the modules applied after the transformer, with
sentence-transformers semantics:
  sentence_transformers.models.Transformer   the model itself (path "")
  sentence_transformers.models.Pooling       `<path>/config.json`: one or more pooling modes,
                                             concatenated
  sentence_transformers.models.Normalize     L2 normalisation
Any other module (Dense, LayerNorm, ...) is refused by name. `sentence_bert_config.json` gives
the longest input (`max_seq_length`) and whether text is lowercased first (`do_lower_case`).
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tvm import te
from tvm.relax.frontend import nn

from relaxlm.errors import RelaxlmError

log = logging.getLogger(__name__)

MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# Pooling config.json's older boolean keys, in the order sentence-transformers concatenates them.
_LEGACY_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_MODULE = "sentence_transformers.models."
_KNOWN_MODULES = ("Transformer", "Pooling", "Normalize")


@dataclass(frozen=True)
class Pooling:
    """How token states become one embedding."""

    modes: tuple[str, ...]  # of MODES; several are concatenated in this order
    normalize: bool  # L2-normalise the result
    max_seq_length: int | None = None  # longest input, in tokens, special tokens included
    lowercase: bool = False  # lowercase text before tokenizing

    def to_manifest(self) -> dict[str, Any]:
        return {
            "pooling": list(self.modes),
            "normalize": self.normalize,
            "max_seq_length": self.max_seq_length,
            "lowercase": self.lowercase,
        }


def read_pooling(folder: Path, default_mode: str) -> Pooling | None:
    """The folder's sentence-transformers pooling; None if it has no modules.json.

    default_mode: the mode sentence-transformers picks when modules.json names no Pooling
    module ("mean" for encoders, "lasttoken" for decoders).
    """
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return None
    modules = read_json(modules_file)
    kinds = [m.get("type", "").removeprefix(_MODULE) for m in modules]
    unknown = [k for k in kinds if k not in _KNOWN_MODULES]
    if unknown:
        raise RelaxlmError(
            f"{modules_file}: sentence-transformers module(s) {', '.join(unknown)} are not "
            f"implemented (supported: {', '.join(_KNOWN_MODULES)})"
        )
    if kinds[:1] != ["Transformer"] or modules[0].get("path", "") != "":
        raise RelaxlmError(
            f"{modules_file}: the first module must be the Transformer stored at the folder's top "
            f'level (path ""); got {modules[0].get("type")!r} at {modules[0].get("path")!r}'
        )
    modes: tuple[str, ...] = (default_mode,)
    for module, kind in zip(modules, kinds, strict=True):
        if kind == "Pooling":
            modes = _pooling_modes(folder / module["path"] / "config.json")
    if "Pooling" not in kinds:
        log.info("%s names no Pooling module; using %s pooling", modules_file, default_mode)
    st_config = read_json(folder / "sentence_bert_config.json")
    return Pooling(
        modes=modes,
        normalize="Normalize" in kinds,
        max_seq_length=st_config.get("max_seq_length"),
        lowercase=bool(st_config.get("do_lower_case", False)),
    )


def _pooling_modes(config_file: Path) -> tuple[str, ...]:
    config = read_json(config_file)
    if not config.get("include_prompt", True):
        log.info("%s: include_prompt false has no effect: embed() takes no prompt", config_file)
    mode = config.get("pooling_mode")
    if mode is None:
        modes = tuple(m for key, m in _LEGACY_KEYS.items() if config.get(key))
        modes = modes or ("mean",)
    else:
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise RelaxlmError(
            f"{config_file}: pooling mode(s) {', '.join(map(repr, unknown))} are not implemented "
            f"(supported: {', '.join(MODES)})"
        )
    return modes


def read_json(path: Path) -> Any:
    """A JSON file's content ({} if the file is absent); one clear error if it is not JSON."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RelaxlmError(f"{path}: not valid JSON ({e})") from e


def pool(hidden: nn.Tensor, attention_mask: nn.Tensor, pooling: Pooling) -> nn.Tensor:
    """[b, s, dim] token states and [b, s] mask (right-padded) -> [b, dim * modes] float32."""
    h = hidden.astype("float32") if hidden.dtype != "float32" else hidden
    mask = nn.op.unsqueeze(attention_mask.astype("float32"), -1)  # [b, s, 1]
    out = []
    for mode in pooling.modes:
        if mode in ("cls", "lasttoken"):
            out.append(_token_at(h, attention_mask, last=mode == "lasttoken"))
        elif mode == "max":
            lowest = nn.Tensor.from_scalar(float("-inf"), "float32")
            out.append(nn.op.max(nn.op.where(mask > 0.5, h, lowest), axis=1))
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            count = nn.op.sum(mask, axis=1).maximum(1e-9)  # [b, 1]
            count = count if mode == "mean" else nn.op.sqrt(count)
            out.append(nn.op.sum(h * mask, axis=1) / count)
        elif mode == "weightedmean":  # weights 1, 2, ... from the first token
            _, s, _ = h.shape
            weights = nn.op.reshape(nn.op.arange(1, s + 1, dtype="float32"), (1, s, 1)) * mask
            total = nn.op.sum(weights, axis=1).maximum(1e-9)
            out.append(nn.op.sum(h * weights, axis=1) / total)
        else:
            raise AssertionError(f"pooling mode {mode!r} passed read_pooling")
    pooled = out[0] if len(out) == 1 else nn.op.concat(out, dim=-1)
    if pooling.normalize:  # torch.nn.functional.normalize: x / max(||x||, 1e-12)
        norm = nn.op.sqrt(nn.op.sum(pooled * pooled, axis=-1, keepdims=True))
        pooled = pooled / norm.maximum(1e-12)
    return pooled


def _token_at(h: nn.Tensor, attention_mask: nn.Tensor, last: bool) -> nn.Tensor:
    """Each row's first (cls) or last real token's state, [b, dim]; rows are right-padded."""

    def compute(h: te.Tensor, mask: te.Tensor) -> te.Tensor:
        b, s, d = h.shape
        if not last:
            return te.compute((b, d), lambda i, j: h[i, 0, j], name="first_token")
        k = te.reduce_axis((0, s), name="k")
        length = te.compute((b,), lambda i: te.sum(mask[i, k].astype("int64"), axis=k))
        # An all-padding row reads position s - 1, as sentence-transformers does.
        return te.compute((b, d), lambda i, j: h[i, (length[i] + s - 1) % s, j], name="last")

    return nn.op.tensor_expr_op(compute, "pool_token", [h, attention_mask])
