"""Reading config.json into an architecture's config dataclass, the same way for every model."""

import dataclasses
import logging
from typing import Any, TypeVar

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


def rope_from_config(raw: dict[str, Any], head_dim: int) -> RopeSpec:
    """RoPE settings from transformers 5 `rope_parameters` or older `rope_theta`/`rope_scaling`."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    rotary_dim = int(head_dim * raw.get("partial_rotary_factor", 1.0))
    if rope_type == "default":
        return RopeSpec(theta=theta, rotary_dim=rotary_dim)
    if rope_type == "linear":
        return RopeSpec(theta=theta, rotary_dim=rotary_dim, scale=float(params["factor"]))
    if rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        scaling = {"rope_type": "llama3", **{k: float(params[k]) for k in keys}}
        return RopeSpec(theta=theta, rotary_dim=rotary_dim, scaling=scaling)
    raise RelaxlmError(
        f"config.json asks for rope type {rope_type!r}, which relaxlm does not implement yet "
        "(supported: default, linear, llama3)"
    )
