"""Reading config.json into an architecture's config dataclass, the same way for every model."""

import dataclasses
import logging
import math
from collections.abc import Callable
from typing import Any, TypeVar

from tvm.relax.frontend import nn

from relaxlm.errors import RelaxlmError

from .ops import RopeSpec

log = logging.getLogger(__name__)

C = TypeVar("C")


def from_config(cls: type[C], raw: dict[str, Any], **resolved: Any) -> C:
    """Build dataclass `cls` from config.json keys; unknown keys are kept in `extra`.

    `resolved` holds values the caller derived (aliases, defaults); each is logged by name
    when the checkpoint did not set it.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    known = {k: v for k, v in raw.items() if k in names and k != "extra"}
    for key, value in resolved.items():
        if raw.get(key) is None:
            log.info("config: %s not set, using %r", key, value)
            known[key] = value
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in known
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise RelaxlmError(f"config.json lacks required keys: {', '.join(missing)}")
    extra = {k: v for k, v in raw.items() if k not in names}
    return cls(**known, extra=extra)


def check_kv_heads(num_attention_heads: int, num_key_value_heads: int) -> None:
    """Grouped-query attention needs whole groups of query heads per key/value head."""
    if num_attention_heads % num_key_value_heads:
        raise RelaxlmError(
            f"config.json: num_attention_heads {num_attention_heads} is not a multiple of "
            f"num_key_value_heads {num_key_value_heads}"
        )


def rope_from_config(
    raw: dict[str, Any], head_dim: int, params: dict[str, Any] | None = None
) -> RopeSpec:
    """RoPE settings from transformers 5 `rope_parameters` or older `rope_theta`/`rope_scaling`.

    params: the rope parameters to read instead of the top-level ones (Gemma 3 keeps one set
    per layer type); top-level keys still fill in what they lack.
    """
    if params is None:
        params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    params = dict(params)
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    rotary_dim = int(head_dim * partial)
    if rope_type == "default":
        return RopeSpec(theta=theta, rotary_dim=rotary_dim)
    if rope_type == "linear":
        return RopeSpec(theta=theta, rotary_dim=rotary_dim, scale=float(params["factor"]))
    if rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        scaling = {"rope_type": "llama3", **{k: float(params[k]) for k in keys}}
        return RopeSpec(theta=theta, rotary_dim=rotary_dim, scaling=scaling)
    if rope_type in ("longrope", "su"):  # "su" is LongRoPE's name in older Phi-3 configs
        return RopeSpec(theta=theta, rotary_dim=rotary_dim, scaling=_longrope(raw, params))
    raise RelaxlmError(
        f"config.json asks for rope type {rope_type!r}, which relaxlm does not implement yet "
        "(supported: default, linear, llama3, longrope)"
    )


def _longrope(raw: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """LongRoPE scaling as transformers computes it (`_compute_longrope_parameters`)."""
    original = params.get("original_max_position_embeddings") or raw.get(
        "original_max_position_embeddings"
    )
    if not original:
        raise RelaxlmError("config.json: longrope needs original_max_position_embeddings")
    factor = params.get("factor") or raw["max_position_embeddings"] / original
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        attention_factor = (
            math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1.0 else 1.0
        )
    return {
        "rope_type": "longrope",
        "short_factor": [float(f) for f in params["short_factor"]],
        "long_factor": [float(f) for f in params["long_factor"]],
        "original_max_position_embeddings": int(original),
        "attention_factor": float(attention_factor),
    }


def layer_windows(
    raw: dict[str, Any], num_layers: int, default_types: list[str] | None = None
) -> list[int]:
    """Each layer's sliding window (0 = full attention), read as transformers reads it.

    `layer_types` ("sliding_attention" / "full_attention") when config.json has it, else
    `default_types` (the architecture's own pattern), else Qwen2's rule (layers from
    `max_window_layers` on slide), else every layer slides. `use_sliding_window: false` turns
    windows off. A window at least `max_position_embeddings` long never binds and is dropped.
    """
    window = raw.get("sliding_window")
    if not window or raw.get("use_sliding_window") is False:
        return [0] * num_layers
    types = raw.get("layer_types") or default_types
    if types is None and raw.get("max_window_layers") is not None:
        first = raw["max_window_layers"]
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    if types is None:
        types = ["sliding_attention"] * num_layers
    if len(types) != num_layers:
        raise RelaxlmError(
            f"config.json: layer_types has {len(types)} entries for {num_layers} layers"
        )
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise RelaxlmError(f"config.json: layer_types {unknown} are not supported")
    if window >= raw.get("max_position_embeddings", float("inf")):
        log.info("sliding_window %d >= max_position_embeddings: full attention", window)
        return [0] * num_layers
    return [int(window) if t == "sliding_attention" else 0 for t in types]


# config.json activation names -> graph ops (transformers' ACT2FN names)
_ACTIVATIONS: dict[str, Callable[[nn.Tensor], nn.Tensor]] = {
    "silu": nn.op.silu,
    "swish": nn.op.silu,
    "relu": nn.op.relu,
    "gelu": nn.op.gelu,  # erf form
    "gelu_new": lambda x: nn.op.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: nn.op.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * nn.op.sigmoid(x * 1.702),  # CLIP's
}


def activation(key: str, name: str) -> Callable[[nn.Tensor], nn.Tensor]:
    """The graph op for activation `name`, read from config.json key `key`."""
    if name not in _ACTIVATIONS:
        raise RelaxlmError(
            f"config.json: {key} {name!r} is not supported (supported: {', '.join(_ACTIVATIONS)})"
        )
    return _ACTIVATIONS[name]
