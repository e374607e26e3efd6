"""The weight plan: which tensors a compiled library takes, in order, and how each is made
from the checkpoint's tensors.

The graph passes decide the plan (`fuse_parallel_linear` concatenates rows of weights that
share an input, `quantize_weights` replaces a weight by its packed parts); the pipeline names
it (`weight_plan`) and converts the checkpoint's tensors to match (`converted_weights`).
"""

import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from relaxlm.frontends import ExportedModel
from relaxlm.frontends.checkpoint import Checkpoint

from .quantization import (
    A8_REPACKS,
    GGUF_A8,
    GGUF_SCHEMES,
    SCHEMES,
    QuantKind,
    QuantScheme,
    asym_int4,
    dequantize,
    pack_int4,
    quantize,
    repack_gguf,
)

# Float types a GGUF file stores tensors in -> the scheme that keeps them so.
_CAST_TYPES = {"F16": "float16", "BF16": "bfloat16"}
# 4-bit layers of an AWQ / GPTQ checkpoint ("INT4_G128"; frontends/prequantized.py).
_INT4_TYPE = re.compile(r"INT4_G(\d+)")


def _int4_scheme(stored_type: str | None) -> QuantScheme | None:
    """The scheme that keeps a checkpoint's AWQ / GPTQ layer as it is; None for others."""
    m = _INT4_TYPE.fullmatch(stored_type or "")
    return asym_int4(int(m[1])) if m else None


@dataclass(frozen=True)
class PackedField:
    """One field of the weight tuple after `quantize_weights`: a whole weight (part "") or one
    stored part ("q", "scale", "zero") of a quantized one."""

    source: int  # index of the weight in the tuple before quantization
    part: str
    shape: tuple[int, ...]
    dtype: str
    scheme: QuantScheme | None = None  # of a part


@dataclass(frozen=True)
class PlannedWeight:
    """One tensor the library takes: its name in the artifact and what it is made from."""

    name: str
    sources: tuple[str, ...]  # checkpoint tensors whose rows it concatenates, in order
    part: str  # "" (the weight itself) | "q" | "scale" | "zero"
    shape: tuple[int, ...]
    dtype: str
    scheme: QuantScheme | None = None  # of a part


def weight_plan(
    exported: ExportedModel, sources: list[tuple[int, ...]], fields: list[PackedField] | None
) -> list[PlannedWeight]:
    """Every tensor the library takes, in its parameter order.

    sources: per field of the fused tuple, the checkpoint tensors (indices into
        `exported.param_names`) whose rows it concatenates (see `fuse_parallel_linear`).
    fields: the fields `quantize_weights` made of the fused tuple; None if it did not run.
    """
    members = [tuple(exported.param_names[i] for i in s) for s in sources]
    if fields is None:
        fields = []
        for i, names in enumerate(members):
            shapes = [exported.param_shapes[n] for n in names]
            rows = sum(s[0] for s in shapes)
            shape = (rows, *shapes[0][1:]) if len(names) > 1 else tuple(shapes[0])
            fields.append(PackedField(i, "", shape, exported.dtype))
    plan = []
    for field in fields:
        names = members[field.source]
        name = _fused_name(names)
        plan.append(
            PlannedWeight(
                name=f"{name}.{field.part}" if field.part else name,
                sources=names,
                part=field.part,
                shape=field.shape,
                dtype=field.dtype,
                scheme=field.scheme,
            )
        )
    return plan


def _fused_name(names: tuple[str, ...]) -> str:
    """a.q_proj.weight + a.k_proj.weight -> a.q_proj+k_proj.weight (the name if alone)."""
    if len(names) == 1:
        return names[0]
    head = os.path.commonprefix(names)
    head = head[: head.rfind(".") + 1]
    tail = os.path.commonprefix([n[::-1] for n in names])[::-1]
    tail = tail[tail.find(".") :] if "." in tail else ""
    return head + "+".join(n[len(head) : len(n) - len(tail)] for n in names) + tail


def dtype_of(dtype: str) -> np.dtype:
    """numpy dtype for a weight dtype name (bfloat16 through ml_dtypes)."""
    if dtype == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def stored_schemes(
    checkpoint: Checkpoint,
    exported: ExportedModel,
    scheme: QuantScheme | None,
    repack: bool = False,
) -> dict[int, QuantScheme]:
    """Packed-param index -> the scheme its weight is stored in, for weights kept as stored.

    Without a requested scheme, GGUF block types (Q4_K, ...) are kept byte for byte, F16 /
    BF16 tensors as they are, and AWQ / GPTQ layers as `q4-asym` in their own groups; with
    `repack` (`--quant gguf-a8`) the block types of A8_REPACKS are kept as their codes and
    scales in int8_dot.py's row tiles instead. With a scheme, nothing is kept: every weight is
    converted to it (blocks and 4-bit layers dequantized exactly first, see
    `converted_weights`).
    """
    out = {}
    for i, name in enumerate(exported.param_names):
        ggml_type = checkpoint.stored_types.get(name, "F32")
        if repack and ggml_type in A8_REPACKS:
            out[i] = A8_REPACKS[ggml_type]
        elif ggml_type in GGUF_SCHEMES and scheme is None:
            out[i] = GGUF_SCHEMES[ggml_type]
        elif (int4 := _int4_scheme(ggml_type)) and scheme is None:
            out[i] = int4
        elif ggml_type in _CAST_TYPES and scheme is None and exported.dtype == "float32":
            out[i] = SCHEMES[_CAST_TYPES[ggml_type]]
    return out


def quantization_manifest(
    checkpoint: Checkpoint,
    scheme: QuantScheme | None,
    plan: list[PlannedWeight],
    repack: bool = False,
) -> dict:
    """The requested scheme (and the one a tied embedding table takes where it differs), and
    for a GGUF file the formats its weights are kept in (`gguf-a8` where its blocks were
    repacked for int8 activations)."""
    out = scheme.to_manifest() if scheme else {"scheme": "none"}
    for weight in plan:
        if weight.part == "q" and scheme is not None and weight.scheme != scheme:
            name = weight.name.removesuffix(".q")
            out["tied_table"] = {"weight": name, **weight.scheme.to_manifest()}
    if checkpoint.stored_types:
        kept: dict[str, int] = {}
        for weight in plan:
            if weight.part in ("", "q"):
                name = weight.scheme.name if weight.scheme else weight.dtype
                kept[name] = kept.get(name, 0) + 1
        source = getattr(checkpoint, "method", "") or "gguf"  # an AWQ / GPTQ folder says which
        out = {**out, "source": source, "tensors": kept}
        if repack:
            out = {**out, "scheme": GGUF_A8, "activations": "int8"}
        elif scheme is None:
            out["scheme"] = source
        else:
            out["requantized_from"] = requantized_types(checkpoint)
    return out


def requantized_types(checkpoint: Checkpoint) -> dict[str, int]:
    """GGUF block type (or AWQ / GPTQ "INT4_G<group>") -> how many of the file's tensors are in
    it (those a requested scheme converts: dequantized exactly, then quantized again)."""
    out: dict[str, int] = {}
    for ggml_type in checkpoint.stored_types.values():
        if ggml_type in GGUF_SCHEMES or _int4_scheme(ggml_type):
            out[ggml_type] = out.get(ggml_type, 0) + 1
    return out


def converted_weights(
    checkpoint: Checkpoint,
    exported: ExportedModel,
    plan: list[PlannedWeight],
    progress: bool,
    repack: bool = False,
) -> Iterator[tuple[str, np.ndarray]]:
    """The plan's tensors in order, each checkpoint tensor read and converted once.

    One tensor at a time: peak memory stays near the largest tensor, not the model. Stored
    blocks (GGUF) are copied as they are, AWQ / GPTQ layers repacked; a block tensor the graph
    needs as floats, or that a requested scheme converts, is dequantized exactly (numpy
    reference) first (an AWQ / GPTQ checkpoint reads its layers so).
    """
    compute = dtype_of(exported.dtype)  # of scales and zero points
    # One run of consecutive entries per tensor read (a tied table's sources may come twice:
    # as a table in one pipeline stage, quantized as the logits head in another).
    count = sum(1 for i, w in enumerate(plan) if i == 0 or plan[i - 1].sources != w.sources)
    weights = iter(plan)
    bar = tqdm(range(count), desc="weights", unit="tensor", disable=not progress, file=sys.stderr)
    for _ in bar:
        first = next(weights)
        names = first.sources  # fused rows (fuse_parallel_linear) share one stored format
        if first.part == "q" and all(
            _int4_scheme(checkpoint.stored_types.get(n)) == first.scheme for n in names
        ):  # AWQ / GPTQ layers kept: their codes repacked, nothing rounded again
            layers = [pack_int4(first.scheme, *checkpoint.read_int4(n), compute) for n in names]
            parts = [np.concatenate(p, axis=0) for p in zip(*layers, strict=True)]
            yield first.name, parts[0]
            for part in parts[1:]:
                yield next(weights).name, part
            continue
        arrays = [checkpoint.read(n) for n in names]
        kinds = {checkpoint.stored_types.get(n) for n in names}
        if repack and first.part == "q" and len(kinds) == 1 and (kind := kinds.pop()) in A8_REPACKS:
            # `gguf-a8`: the blocks' codes and scales moved into row tiles, nothing rounded
            raw = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
            k = exported.param_shapes[names[0]][-1]
            parts = repack_gguf(first.scheme, kind, raw, k)
            yield first.name, parts[0]
            for part in parts[1:]:
                yield next(weights).name, part
            continue
        if first.part == "" or first.scheme.kind != QuantKind.GGUF:  # needed as numbers
            arrays = [
                _unblocked(checkpoint, exported, n, a) for n, a in zip(names, arrays, strict=True)
            ]
        array = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
        if first.part == "":  # stored as is, in its dtype (a cast scheme's narrower one)
            # via float32: numpy cannot cast bfloat16 to float16 directly
            target = dtype_of(first.dtype)
            yield first.name, array.astype(np.float32, copy=False).astype(target, copy=False)
            continue
        if first.scheme.kind == QuantKind.GGUF:  # the file's own blocks, byte for byte
            assert array.shape == first.shape, (names, array.shape, first.shape)
            yield first.name, array
            continue
        parts = quantize(first.scheme, array, compute)
        yield first.name, parts[0]
        for part in parts[1:]:
            yield next(weights).name, part


def _unblocked(checkpoint: Checkpoint, exported: ExportedModel, name: str, array: np.ndarray):
    """A checkpoint tensor as numbers: GGUF blocks dequantized exactly, others as read."""
    kind = checkpoint.stored_types.get(name)
    if kind not in GGUF_SCHEMES:
        return array
    return dequantize(GGUF_SCHEMES[kind], [array], exported.param_shapes[name][-1])
