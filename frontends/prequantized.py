"""AWQ and GPTQ checkpoints: 4-bit weights quantized by AutoAWQ or GPTQ (AutoGPTQ, optimum,
GPTQModel), read as the integers they are.

Such a folder is a Hugging Face checkpoint whose config.json has a `quantization_config`, and
whose quantized linear layers `P` store, instead of `P.weight` [N, K]:
- GPTQ: `P.qweight` int32 [K/8, N], 8 consecutive k per word (k = 8w + j in bits 4j..4j+3);
  `P.qzeros` int32 [G, N/8], 8 consecutive n per word, stored as zero - 1 in the original
  format (`checkpoint_format` "gptq"; "gptq_v2" stores the zero itself); `P.scales` float16
  [G, N]; `P.g_idx` int32 [K], the group of each k.
- AWQ (`version` "gemm"): `P.qweight` int32 [K, N/8] and `P.qzeros` int32 [G, N/8], 8 columns
  per word in the order 0 2 4 6 1 3 5 7 (nibble j holds column 8w + AWQ_ORDER[j]); `P.scales`
  float16 [G, N]; group g holds k in [g * group_size, (g + 1) * group_size).
Both mean  W[n, k] = scale[g(k), n] * (q[k, n] - zero[g(k), n]).

The checkpoint presents each such layer as `P.weight`: `read` gives its exact float values,
`read_int4` its codes, scales and zero points, which the compiler packs into its own 4-bit
layout (`q4-asym` with the file's group size) without rounding anything again. Act-order GPTQ
(a g_idx that is not k // group_size) is refused: its groups are not contiguous in k.
"""

from dataclasses import dataclass

import numpy as np

from relaxlm.artifacts.safetensors_io import TensorInfo, read
from relaxlm.errors import RelaxlmError

from .checkpoint import Checkpoint

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_PARTS = ("qweight", "qzeros", "scales", "g_idx")


@dataclass(frozen=True)
class Int4Tensor:
    """A quantized layer as the graph sees it: [N, K] float values."""

    stored: dict[str, TensorInfo]  # "qweight", "qzeros", "scales" (and "g_idx")
    shape: tuple[int, int]
    group_size: int
    dtype: np.dtype = np.dtype("float32")

    @property
    def parts(self) -> tuple[TensorInfo, ...]:  # for Checkpoint.weight_files
        return tuple(self.stored.values())

    @property
    def stored_type(self) -> str:
        return f"INT4_G{self.group_size}"


@dataclass
class PrequantizedCheckpoint(Checkpoint):
    """A Hugging Face folder of AWQ or GPTQ 4-bit layers (see the module docstring)."""

    method: str = ""  # "gptq" | "awq"
    zero_offset: int = 0  # added to stored zero points (1 in GPTQ's original format)

    @property
    def stored_types(self) -> dict[str, str]:
        """P.weight -> "INT4_G<group size>" for each 4-bit layer."""
        return {n: t.stored_type for n, t in self.tensors.items() if isinstance(t, Int4Tensor)}

    def read(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        if not isinstance(info, Int4Tensor):
            return super().read(name)
        codes, scale, zero = self.read_int4(name)
        groups = codes.reshape(codes.shape[0], -1, info.group_size).astype(np.float32)
        return ((groups - zero[..., None]) * scale[..., None]).reshape(info.shape)

    def read_int4(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """codes uint8 [N, K] (0..15), scale float32 [N, G] and zero float32 [N, G] of `name`,
        rows first as the graph's weights are."""
        info = self.tensors[name]
        qweight, qzeros = (read(info.stored[p]).view(np.uint32) for p in ("qweight", "qzeros"))
        scale = read(info.stored["scales"]).astype(np.float32).T
        if self.method == "gptq":
            codes = _nibbles_along_rows(qweight)  # [K, N]
            zero = _nibbles_along_columns(qzeros, range(8))  # [G, N]
        else:
            codes = _nibbles_along_columns(qweight, AWQ_ORDER)
            zero = _nibbles_along_columns(qzeros, AWQ_ORDER)
        zero = (zero.astype(np.float32) + self.zero_offset).T
        return tuple(np.ascontiguousarray(a) for a in (codes.T, scale, zero))


def _nibbles_along_rows(words: np.ndarray) -> np.ndarray:
    """int32 [R/8, C] holding rows 8w..8w+7 of column c in nibbles 0..7 -> uint8 [R, C]."""
    shifts = (np.arange(8, dtype=np.uint32) * 4)[None, :, None]
    nibbles = (words[:, None, :] >> shifts) & 0xF  # [R/8, 8, C]
    return nibbles.reshape(-1, words.shape[1]).astype(np.uint8)


def _nibbles_along_columns(words: np.ndarray, order) -> np.ndarray:
    """int32 [R, C/8], nibble j of word w holding column 8w + order[j] -> uint8 [R, C]."""
    shifts = np.arange(8, dtype=np.uint32) * 4
    nibbles = (words[..., None] >> shifts) & 0xF  # [R, C/8, j]
    out = np.empty_like(nibbles)
    out[..., list(order)] = nibbles
    return out.reshape(words.shape[0], -1).astype(np.uint8)


def _check_groups(name: str, g_idx: np.ndarray, group_size: int) -> None:
    if not np.array_equal(g_idx, np.arange(g_idx.shape[0]) // group_size):
        raise RelaxlmError(
            f"{name}: this GPTQ checkpoint uses act-order (desc_act: its g_idx is not "
            f"k // {group_size}), which relaxlm cannot keep as 4-bit groups; use a checkpoint "
            "quantized with desc_act=False, or the unquantized model"
        )


def prequantized(checkpoint: Checkpoint) -> Checkpoint:
    """`checkpoint` as a PrequantizedCheckpoint if its config says AWQ or GPTQ; else itself."""
    qc = checkpoint.config.get("quantization_config")
    if not qc:
        return checkpoint
    method = str(qc.get("quant_method", "")).lower()
    where = f"{checkpoint.path / 'config.json'}: quantization_config"
    if method not in ("gptq", "awq"):
        raise RelaxlmError(
            f"{where} has quant_method {method!r}; relaxlm reads AWQ and GPTQ checkpoints (or "
            "quantizes a float checkpoint itself: --quant)"
        )
    bits = qc.get("bits", qc.get("w_bit"))
    group = qc.get("group_size", qc.get("q_group_size"))
    if bits != 4:
        raise RelaxlmError(f"{where}: {bits}-bit weights; relaxlm reads 4-bit {method} only")
    if not isinstance(group, int) or group <= 0 or group % 32:
        raise RelaxlmError(
            f"{where}: group_size {group!r}; relaxlm reads groups of a multiple of 32 "
            "(per-channel, -1, is not supported)"
        )
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm" or qc.get("zero_point") is False:
            raise RelaxlmError(
                f"{where}: AWQ version {version!r}, zero_point {qc.get('zero_point')!r}; "
                "relaxlm reads the GEMM layout with zero points"
            )
        offset = 0
    else:
        fmt = str(qc.get("checkpoint_format", "gptq")).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise RelaxlmError(f"{where}: checkpoint_format {fmt!r}; use gptq or gptq_v2")
        offset = 1 if fmt == "gptq" else 0
    tensors = dict(checkpoint.tensors)
    layers = {n.removesuffix(".qweight") for n in tensors if n.endswith(".qweight")}
    for layer in sorted(layers):
        parts = {p: tensors.pop(f"{layer}.{p}") for p in _PARTS if f"{layer}.{p}" in tensors}
        missing = [p for p in _PARTS[:3] if p not in parts]
        if missing:
            raise RelaxlmError(f"{checkpoint.path}: {layer} lacks {', '.join(missing)}")
        if not all(isinstance(p, TensorInfo) for p in parts.values()):
            raise RelaxlmError(
                f"{checkpoint.path}: {layer}: 4-bit layers of mixture-of-experts models are not "
                "supported yet; use the float checkpoint (with --quant q4 or another scheme)"
            )
        n = parts["scales"].shape[1]
        k = parts["qweight"].shape[0] * (8 if method == "gptq" else 1)
        if k % group or parts["scales"].shape[0] != k // group:
            raise RelaxlmError(
                f"{checkpoint.path}: {layer}: scales are {parts['scales'].shape} for "
                f"K={k} in groups of {group}"
            )
        if "g_idx" in parts:  # checked now: before anything is built
            _check_groups(layer, read(parts["g_idx"]), group)
        tensors[f"{layer}.weight"] = Int4Tensor(parts, (n, k), group)
    return PrequantizedCheckpoint(
        path=checkpoint.path,
        config=checkpoint.config,
        tensors=tensors,
        method=method,
        zero_offset=offset,
    )
