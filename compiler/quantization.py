"""Weight quantization schemes: frozen dataclasses, the named presets, and the numpy
reference that packs weights (at compile time) and unpacks them (in tests).

Every scheme stores a weight [N, K] as parts laid out along K, padded with zeros to a whole
number of groups (and of packed words), so any K works:
- q8      int8 [N, Kp]                  scale [N, Kp/32]            w = q * scale
- q4      uint32 [N, Kp/8] (8 nibbles)  scale [N, Kp/32]            w = (nibble - 8) * scale
- q4-asym uint32 [N, Kp/8]              scale, zero [N, Kp/128]     w = (nibble - zero) * scale
- float16 / bfloat16: the weight itself in that dtype, cast to the compute dtype on the fly.
4-bit values are interleaved in blocks of 128 along K: word 16 * b + l holds, in nibble j
(lowest bits first), k = 128 * b + 16 * j + l. So 16 consecutive words hold 16 consecutive k
at the same shift: a decode kernel unpacks 16 weights with one vector load, shift and mask
(AWQ/GPTQ checkpoints pack 8 consecutive k per word; loading them is a bit permutation,
never a requantization).
"""

from dataclasses import dataclass

import numpy as np

from relaxlm.errors import RelaxlmError

INTERLEAVE = 128  # K-block of the 4-bit layout: 16 words x 8 nibbles


@dataclass(frozen=True)
class QuantScheme:
    name: str
    kind: str  # "int" (packed integers with scales) or "cast" (a narrower float dtype)
    bits: int = 0
    group_size: int = 0
    symmetric: bool = True
    storage_dtype: str = ""  # dtype of the packed part: int8, uint32, float16, bfloat16

    @property
    def block(self) -> int:
        """K is padded to a multiple of this: whole groups and whole interleaved blocks."""
        return max(self.group_size, INTERLEAVE if self.per_word > 1 else 1)

    @property
    def per_word(self) -> int:
        """Values packed into one storage element."""
        return 32 // self.bits if self.storage_dtype == "uint32" else 1

    def padded_k(self, k: int) -> int:
        return -(-k // self.block) * self.block

    def part_shapes(self, n: int, k: int) -> dict[str, tuple[int, ...]]:
        """Name suffix -> shape of each stored part for a weight [n, k]."""
        if self.kind == "cast":
            return {"": (n, k)}
        kp = self.padded_k(k)
        parts = {"q": (n, kp // self.per_word), "scale": (n, kp // self.group_size)}
        if not self.symmetric:
            parts["zero"] = (n, kp // self.group_size)
        return parts

    def to_manifest(self) -> dict:
        return {
            "scheme": self.name,
            "kind": self.kind,
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "storage_dtype": self.storage_dtype,
            "packing": f"nibbles interleaved in blocks of {INTERLEAVE} along K"
            if self.per_word > 1
            else "one per element",
        }


SCHEMES: dict[str, QuantScheme | None] = {
    "none": None,
    "q8": QuantScheme("q8", "int", bits=8, group_size=32, storage_dtype="int8"),
    "q4": QuantScheme("q4", "int", bits=4, group_size=32, storage_dtype="uint32"),
    "q4-asym": QuantScheme(
        "q4-asym", "int", bits=4, group_size=128, symmetric=False, storage_dtype="uint32"
    ),
    "float16": QuantScheme("float16", "cast", storage_dtype="float16"),
    "bfloat16": QuantScheme("bfloat16", "cast", storage_dtype="bfloat16"),
}


def resolve_scheme(name: str) -> QuantScheme | None:
    if name not in SCHEMES:
        raise RelaxlmError(
            f"quantization {name!r} is not supported; use one of {', '.join(SCHEMES)}"
        )
    return SCHEMES[name]


ROWS_PER_CHUNK_ELEMENTS = 1 << 22  # rows are packed in chunks of ~4M values: bounded temporaries


def quantize(scheme: QuantScheme, weight: np.ndarray, compute_dtype: np.dtype) -> list[np.ndarray]:
    """Pack a float weight [N, K]; the parts in `part_shapes` order."""
    rows = max(1, ROWS_PER_CHUNK_ELEMENTS // max(1, weight.shape[1]))
    if weight.shape[0] <= rows:
        return _quantize_rows(scheme, weight, compute_dtype)
    chunks = [
        _quantize_rows(scheme, weight[i : i + rows], compute_dtype)
        for i in range(0, weight.shape[0], rows)
    ]
    return [np.concatenate(parts) for parts in zip(*chunks, strict=True)]


def _quantize_rows(scheme: QuantScheme, weight: np.ndarray, compute_dtype) -> list[np.ndarray]:
    if scheme.kind == "cast":
        return [weight.astype(np.float32).astype(_np_dtype(scheme.storage_dtype))]
    w = weight.astype(np.float32)
    n, k = w.shape
    kp = scheme.padded_k(k)
    w = np.pad(w, ((0, 0), (0, kp - k)))  # zeros quantize exactly, to 0 or to the zero point
    groups = w.reshape(n, kp // scheme.group_size, scheme.group_size)
    levels = (1 << scheme.bits) - 1
    if scheme.symmetric:
        half = 1 << (scheme.bits - 1)  # 128 or 8: values in [-half, half - 1]
        scale = np.abs(groups).max(axis=2) / (half - 1)
        scale = np.where(scale == 0, 1.0, scale).astype(compute_dtype)
        q = np.clip(np.rint(groups / scale.astype(np.float32)[..., None]), -half, half - 1)
        if scheme.storage_dtype == "int8":
            return [q.reshape(n, kp).astype(np.int8), scale]
        codes = (q + half).astype(np.uint32).reshape(n, kp)
        return [_pack(codes, scheme.bits), scale]
    lo, hi = groups.min(axis=2), groups.max(axis=2)
    lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)  # keep 0 representable (padding, sparsity)
    scale = (hi - lo) / levels
    scale = np.where(scale == 0, 1.0, scale).astype(compute_dtype)
    zero = np.clip(np.rint(-lo / scale.astype(np.float32)), 0, levels).astype(compute_dtype)
    q = np.rint(groups / scale.astype(np.float32)[..., None] + zero.astype(np.float32)[..., None])
    codes = np.clip(q, 0, levels).astype(np.uint32).reshape(n, kp)
    return [_pack(codes, scheme.bits), scale, zero]


def dequantize(scheme: QuantScheme, parts: list[np.ndarray], k: int) -> np.ndarray:
    """The float32 weight [N, K] the kernels compute with (numpy reference)."""
    if scheme.kind == "cast":
        return parts[0].astype(np.float32)
    q, scale = parts[0], parts[1].astype(np.float32)
    n = q.shape[0]
    if scheme.storage_dtype == "int8":
        codes = q.astype(np.float32)
    else:
        codes = _unpack(q, scheme.bits).astype(np.float32)
        if scheme.symmetric:
            codes -= 1 << (scheme.bits - 1)
    groups = codes.reshape(n, -1, scheme.group_size)
    if not scheme.symmetric:
        groups = groups - parts[2].astype(np.float32)[..., None]
    # contiguous: a [:, :k] view of padded rows trips writers that take the raw buffer
    return np.ascontiguousarray((groups * scale[..., None]).reshape(n, -1)[:, :k])


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    n, kp = codes.shape
    per = 32 // bits
    lanes = INTERLEAVE // per
    codes = codes.reshape(n, kp // INTERLEAVE, per, lanes)  # [n, block, nibble j, lane l]
    shifts = (np.arange(per, dtype=np.uint32) * bits)[:, None]
    words = np.bitwise_or.reduce(codes << shifts, axis=2)  # [n, block, lane]
    return words.reshape(n, -1).astype(np.uint32)


def _unpack(words: np.ndarray, bits: int) -> np.ndarray:
    n = words.shape[0]
    per = 32 // bits
    lanes = INTERLEAVE // per
    words = words.reshape(n, -1, 1, lanes)  # [n, block, 1, lane]
    shifts = (np.arange(per, dtype=np.uint32) * bits)[:, None]
    codes = (words >> shifts) & ((1 << bits) - 1)  # [n, block, nibble j, lane l]
    return codes.reshape(n, -1)


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)
