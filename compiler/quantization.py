"""Weight quantization schemes: frozen dataclasses, the named presets, and the numpy
reference that packs weights (at compile time) and unpacks them (in tests).

Every scheme stores a weight [N, K] as parts laid out along K, padded with zeros to a whole
number of groups (and of packed words), so any K works:
- q8      int8 [N, Kp]                  scale [N, Kp/32]            w = q * scale
- q4      uint32 [N, Kp/8] (8 nibbles)  scale [N, Kp/32]            w = (nibble - 8) * scale
  (q8 and q4 scales may be negative: see `_symmetric_codes` for how they are chosen)
- q4-a8   as q4 with float16 scales, packed for int8_dot.py's kernel (see below); activations
          become int8 per group of 32 at run time
  (q4 itself is packed like q4-a8, and q8 in the same row tiles, where every target has that
  kernel: see `row_tiled`)
- q4-asym uint32 [N, Kp/8]              scale, zero [N, Kp/128]     w = (nibble - zero) * scale
- q4_1-a8 uint32 [N, Kp/8] as q4-a8     scale, min [N, Kp/32]       w = nibble * scale + min
  (llama.cpp's Q4_1 blocks repacked, not requantized: `repack_gguf`; with q4-a8 for Q4_0,
  q8-a8 for Q8_0 and the K-quants below these are `--quant gguf-a8`, GGUF blocks computed as
  llama.cpp does)
- q4_k-a8 uint32 [N, Kp/8] as q4-a8     scale uint8 [N, Kp/32 * 2]  w = nibble * sc * d + m * -dmin
                                        d float16 [N, Kp/256 * 2]
  (llama.cpp's Q4_K: per sub-block of 32 its 6-bit sc and m side by side, per super-block of
  256 its d and -dmin so; `super_group`); q5_k-a8 the same with 5-bit codes: per 32 k, 4
  words of low nibbles then a word of high bits (uint32 [N, Kp * 5/32], `_pack_row_codes`)
- q6_k-a8 uint32 [N, Kp * 6/32]         scale int8 [N, Kp/16]       w = (code - 32) * sc * d
                                        d float16 [N, Kp/256]
  (llama.cpp's Q6_K: 6-bit codes as q5_k-a8's with two words of high bits); q3_k-a8 the same
  with 4-bit codes (Q3_K's q + 8, uint32 [N, Kp/8]); q5_0-a8 / q5_1-a8 as q4-a8 / q4_1-a8
  with q5_k-a8's 5-bit codes
- float16 / bfloat16: the weight itself in that dtype, cast to the compute dtype on the fly.
- gguf-*   uint8 [N, K/B * bytes]       llama.cpp's own blocks of B values, kept byte for byte
           (`GGUF_SCHEMES`, one per GGML tensor type; only GGUF files bring them, see
           `dequantize_gguf` for each block layout).
4-bit values are interleaved in blocks of 128 along K: word 16 * b + l holds, in nibble j
(lowest bits first), k = 128 * b + 16 * j + l. So 16 consecutive words hold 16 consecutive k
at the same shift: a decode kernel unpacks 16 weights with one vector load, shift and mask
(AWQ/GPTQ checkpoints pack 8 consecutive k per word; loading them is a bit permutation,
never a requantization).

q4-a8 (and q4 for CPUs with an int8 dot product) packs for an int8 dot product over rows in
vector lanes instead: word w of a row holds k = 8w .. 8w + 7, byte e holding k = 8w + e in
its low nibble and 8w + 4 + e in its high one (K padded to whole groups only); and when N is
a multiple of `row_tile` (16), the words and the scales are stored in tiles of 16 rows,
tile-major: element [r, c] of a part sits at flat index (r // 16 * C + c) * 16 + r % 16 of the
same [N, C] array, so one 64-byte load holds the same word of 16 rows. (Row-tiled q8 stores
its int8 [N, Kp] so too, a word being 4 consecutive k.)
"""

from dataclasses import asdict, dataclass, replace
from enum import StrEnum

import numpy as np

from relaxlm.errors import RelaxlmError

INTERLEAVE = 128  # K-block of the 4-bit layout: 16 words x 8 nibbles
ROW_TILE = 16  # rows per tile of the row-tiled layout (int8_dot.TILE)
ACTIVATION_GROUP = 32  # values per int8 activation scale (int8_dot.GROUP)


class QuantKind(StrEnum):
    """How a scheme stores a weight (the manifest's `kind`)."""

    INT = "int"  # packed integers with scales
    CAST = "cast"  # a narrower float dtype
    GGUF = "gguf"  # raw llama.cpp blocks of `group_size` values, `block_bytes` bytes each


class Activations(StrEnum):
    """What activations are rounded to at run time where the target has an int8 dot product
    (int8_dot.py; the scheme's weights are packed for it, see `row_tile`)."""

    FLOAT = ""  # not rounded (falsy, and absent from the manifest)
    INT8 = "int8"
    INT22 = "int22"


@dataclass(frozen=True)
class QuantScheme:
    name: str
    kind: QuantKind
    bits: int = 0
    group_size: int = 0
    symmetric: bool = True
    storage_dtype: str = ""  # dtype of the packed part: int8, uint32, float16, bfloat16, uint8
    block_bytes: int = 0  # GGUF only
    activations: Activations = Activations.FLOAT
    scale_dtype: str = ""  # dtype of the scales; "" = the model's compute dtype
    # 4-bit words of 8 consecutive k, rows stored in tiles of this many when N is a multiple
    # (see the module docstring); 0: the interleaved layout
    row_tile: int = 0
    # values per super-block (GGUF K-quants: 256) whose float16 `d` (and `dmin`) multiply the
    # groups' integer scales (and mins) of `scale_dtype` uint8 / int8; 0: scales stored as is
    super_group: int = 0

    def __post_init__(self):
        # Read back from JSON (`QuantScheme(**scheme.to_dict())`) the two come as strings.
        object.__setattr__(self, "kind", QuantKind(self.kind))
        object.__setattr__(self, "activations", Activations(self.activations))

    def scale_dtype_for(self, compute_dtype: str) -> str:
        return self.scale_dtype or compute_dtype

    @property
    def block(self) -> int:
        """K is padded to a multiple of this: whole groups and whole interleaved blocks."""
        if self.row_tile:  # whole groups of the kernel's int8 activations too
            return max(self.group_size, ACTIVATION_GROUP, self.super_group)
        return max(self.group_size, INTERLEAVE if self.per_word > 1 else 1)

    @property
    def per_word(self) -> int:
        """Values packed into one storage element (row tiles of 5- or 6-bit codes: 32 per
        `bits` words, see `_pack_row_codes`)."""
        return 32 // self.bits if self.storage_dtype == "uint32" else 1

    def words(self, k_padded: int) -> int:
        """Storage elements per row of the packed codes."""
        if self.row_tile and self.storage_dtype == "uint32":
            return k_padded * self.bits // 32
        return k_padded // self.per_word

    @property
    def ggml_type(self) -> str:
        """The GGML tensor type of a GGUF scheme ("Q4_K"); empty for the others."""
        return self.name.removeprefix("gguf-").upper() if self.kind == QuantKind.GGUF else ""

    def tiled(self, n: int) -> bool:
        """Whether a weight of n rows is stored in row tiles."""
        return bool(self.row_tile) and n % self.row_tile == 0

    def padded_k(self, k: int) -> int:
        return -(-k // self.block) * self.block

    def part_shapes(self, n: int, k: int) -> dict[str, tuple[int, ...]]:
        """Name suffix -> shape of each stored part for a weight [n, k]."""
        if self.kind == QuantKind.CAST:
            return {"": (n, k)}
        if self.kind == QuantKind.GGUF:  # GGUF rows are whole blocks: K is a multiple of the block
            assert k % self.group_size == 0, (self.name, k)
            return {"q": (n, k // self.group_size * self.block_bytes)}
        kp = self.padded_k(k)
        if self.super_group:
            # a group's integer scale and min side by side (one stream for the kernel), and a
            # super-block's float16 d and dmin so
            per = 1 if self.symmetric else 2
            return {
                "q": (n, self.words(kp)),
                "scale": (n, kp // self.group_size * per),
                "d": (n, kp // self.super_group * per),
            }
        parts = {"q": (n, self.words(kp)), "scale": (n, kp // self.group_size)}
        if not self.symmetric:  # row tiles add a min, the interleaved layout a zero point
            parts["min" if self.row_tile else "zero"] = (n, kp // self.group_size)
        return parts

    def part_dtype(self, part: str, compute_dtype: str) -> str:
        """The dtype of a part of `part_shapes`."""
        if part in ("scale", "min"):
            return self.scale_dtype_for(compute_dtype)
        if part == "d":
            return "float16"
        return compute_dtype if part == "zero" else self.storage_dtype

    def to_dict(self) -> dict:
        """Every field, for passing the scheme through JSON (`QuantScheme(**d)` reads it back)."""
        return asdict(self)

    def to_manifest(self) -> dict:
        return {
            "scheme": self.name,
            "kind": self.kind.value,
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "storage_dtype": self.storage_dtype,
            "packing": _packing(self),
            **({"activations": self.activations.value} if self.activations else {}),
            **({"scale_dtype": self.scale_dtype} if self.scale_dtype else {}),
            **({"row_tile": self.row_tile} if self.row_tile else {}),
            **({"super_group": self.super_group} if self.super_group else {}),
        }


def _packing(scheme: QuantScheme) -> str:
    if scheme.kind == QuantKind.GGUF:
        return (
            f"llama.cpp {scheme.ggml_type} blocks: {scheme.block_bytes} bytes per "
            f"{scheme.group_size} values"
        )
    if scheme.row_tile:
        word = (
            "4 consecutive k per 32-bit word"
            if scheme.bits == 8
            else "8 consecutive k per word (byte e: k = 8w + e low nibble, 8w + 4 + e high)"
        )
        if scheme.bits in (5, 6):
            word = f"per 32 k, 4 words of low nibbles ({word}) then {scheme.bits - 4} of high bits"
        supers = (
            f"; {scheme.scale_dtype} scales (and mins) times a float16 d (and dmin) per "
            f"{scheme.super_group}"
            if scheme.super_group
            else ""
        )
        return f"{word}, rows in tiles of {scheme.row_tile} when N is a multiple{supers}"
    if scheme.per_word > 1:
        return f"nibbles interleaved in blocks of {INTERLEAVE} along K"
    return "one per element"


def _gguf(ggml_type: str, bits: int, block: int, block_bytes: int) -> QuantScheme:
    name = f"gguf-{ggml_type.lower()}"
    return QuantScheme(name, QuantKind.GGUF, bits, block, True, "uint8", block_bytes)


# GGML tensor type -> scheme keeping its blocks as they are (llama.cpp's ggml-common.h).
GGUF_SCHEMES: dict[str, QuantScheme] = {
    s.ggml_type: s
    for s in (
        _gguf("Q8_0", 8, 32, 34),  # f16 d, int8 qs[32]
        _gguf("Q4_0", 4, 32, 18),  # f16 d, qs[16] nibbles
        _gguf("Q4_1", 4, 32, 20),  # f16 d, f16 m, qs[16]
        _gguf("Q5_0", 5, 32, 22),  # f16 d, qh[4] high bits, qs[16]
        _gguf("Q5_1", 5, 32, 24),  # f16 d, f16 m, qh[4], qs[16]
        _gguf("Q4_K", 4, 256, 144),  # f16 d, f16 dmin, scales[12] (6-bit), qs[128]
        _gguf("Q5_K", 5, 256, 176),  # f16 d, f16 dmin, scales[12], qh[32], qs[128]
        _gguf("Q6_K", 6, 256, 210),  # ql[128], qh[64], int8 scales[16], f16 d
        _gguf("Q3_K", 3, 256, 110),  # hmask[32], qs[64] (2 low bits), scales[12] (6-bit), f16 d
        _gguf("Q2_K", 2, 256, 84),  # scales[16] (4-bit scale and min), qs[64], f16 d, f16 dmin
    )
}


SCHEMES: dict[str, QuantScheme | None] = {
    "none": None,
    "q8": QuantScheme("q8", QuantKind.INT, bits=8, group_size=32, storage_dtype="int8"),
    "q4": QuantScheme("q4", QuantKind.INT, bits=4, group_size=32, storage_dtype="uint32"),
    # q4 codes x int8 activations, like llama.cpp's Q4_0 (see int8_dot.py); float16 scales
    # as Q4_0's: decode streams 4.5 bits per weight, not 5
    "q4-a8": QuantScheme(
        "q4-a8",
        QuantKind.INT,
        bits=4,
        group_size=32,
        storage_dtype="uint32",
        activations=Activations.INT8,
        scale_dtype="float16",
        row_tile=ROW_TILE,
    ),
    "q4-asym": QuantScheme(
        "q4-asym", QuantKind.INT, bits=4, group_size=128, symmetric=False, storage_dtype="uint32"
    ),
    "float16": QuantScheme("float16", QuantKind.CAST, storage_dtype="float16"),
    "bfloat16": QuantScheme("bfloat16", QuantKind.CAST, storage_dtype="bfloat16"),
}


def asym_int4(group_size: int) -> QuantScheme:
    """`q4-asym` in groups of `group_size`: how AWQ / GPTQ checkpoints' 4-bit layers are kept
    (w = (q - zero) * scale, as theirs)."""
    scheme = SCHEMES["q4-asym"]
    if group_size == scheme.group_size:
        return scheme
    return replace(scheme, name=f"q4-asym-g{group_size}", group_size=group_size)


def pack_int4(
    scheme: QuantScheme,
    codes: np.ndarray,
    scale: np.ndarray,
    zero: np.ndarray,
    compute_dtype: np.dtype,
) -> list[np.ndarray]:
    """The parts of an asymmetric 4-bit scheme from codes already chosen (an AWQ or GPTQ
    layer): codes uint8 [N, K] in 0..15, scale and zero [N, K / group_size]. A bit
    permutation: nothing is rounded again (scales cast to the compute dtype, exact from
    float16 checkpoints; zero points are small integers)."""
    assert scheme.bits == 4 and not scheme.symmetric and not scheme.row_tile, scheme
    n, k = codes.shape
    kp = scheme.padded_k(k)
    extra_groups = (kp - k) // scheme.group_size
    codes = np.pad(codes.astype(np.uint32), ((0, 0), (0, kp - k)))  # padded k: 0 * any scale
    scale = np.pad(scale, ((0, 0), (0, extra_groups)), constant_values=1).astype(compute_dtype)
    zero = np.pad(zero, ((0, 0), (0, extra_groups))).astype(compute_dtype)
    return [_pack(codes, scheme.bits), scale, zero]


def row_tiled(scheme: QuantScheme) -> QuantScheme:
    """The scheme as stored where every target has an int8 dot product (int8_dot.py): `q4` and
    `q8` in row tiles, their activations rounded to integers fine enough to keep them exact
    against their dequantized weights (codes and scales are unchanged, only their order).
    Elsewhere they keep the layouts the GPU kernels read with coalesced loads."""
    if scheme.name in ("q4", "q8") and not scheme.row_tile:
        return replace(scheme, activations=Activations.INT22, row_tile=ROW_TILE)
    return scheme


def tied_table_scheme(scheme: QuantScheme) -> QuantScheme:
    """The scheme an embedding table that is also the lm_head's is stored in: 8-bit codes where
    `scheme` has fewer bits, in its layout and activations (q4-a8: `q8-a8`, int8 codes times
    int8 activations on the same kernel), as llama.cpp keeps a tied table at Q8_0 in its 4-bit
    files. The head's rounding reaches the logits directly: on SmolLM2-135M (GPL-3 text, the
    slow perplexity test) q4 with a 4-bit table scored 30.3, past llama.cpp's Q4_0 (29.3);
    with an 8-bit one, 28.2."""
    if scheme.kind != QuantKind.INT or scheme.bits >= 8:
        return scheme
    name = "q8-a8" if scheme.activations == Activations.INT8 else "q8"
    return replace(
        SCHEMES["q8"],
        name=name,
        activations=scheme.activations,
        scale_dtype=scheme.scale_dtype,
        row_tile=scheme.row_tile,
    )


# `--quant gguf-a8`: a GGUF file's blocks, where they are whole groups of 32 along K with one
# scale (and min) each, repacked into the row tiles of int8_dot.py's kernel as they are (their
# codes and fp16 scales bit for bit), which round the activations to int8 per group of 32 as
# llama.cpp's own Q8_0 / Q8_1 activations: Q4_0 -> q4-a8, Q8_0 -> q8-a8, Q4_1 -> q4_1-a8, and
# Q4_K -> q4_k-a8 (sub-blocks of 32 with their own 6-bit scale sc and min m as bytes, and the
# super-block's fp16 d and -dmin: 4.625 bits a weight, as the file's 4.5; the kernel forms
# d * sc and -dmin * m in float32, exactly); Q5_K -> q5_k-a8 as Q4_K with a plane of high bits
# (5.625 bits, the file's 5.5); Q6_K -> q6_k-a8: 6-bit codes q (two planes), the int8 scale sc
# per 16 values and the fp16 d per 256 (6.5625 bits, the file's 6.5625), the kernel taking two
# weight scales per group of 32 activations; Q3_K -> q3_k-a8 as q6_k-a8 with 4-bit codes q + 8
# (q in -4 .. 3; 4.5625 bits, the file's 3.4375: 3-bit codes would need a kernel unpacking
# them). Q5_0 -> q5_0-a8 (5-bit codes q as q5_k-a8's, bias 16, fp16 d per 32: 5.5 bits, the
# file's 5.5), Q5_1 -> q5_1-a8 (the same with an fp16 min: 6 bits, the file's 6). Q2_K's
# blocks stay blocks (computed by the float kernel): a min per 16 values, the kernel's
# activation sums are per 32.
GGUF_A8 = "gguf-a8"
_Q4_1_A8 = QuantScheme(
    "q4_1-a8",
    QuantKind.INT,
    bits=4,
    group_size=32,
    symmetric=False,
    storage_dtype="uint32",
    activations=Activations.INT8,
    scale_dtype="float16",
    row_tile=ROW_TILE,
)
A8_REPACKS: dict[str, QuantScheme] = {
    "Q4_0": SCHEMES["q4-a8"],
    "Q8_0": tied_table_scheme(SCHEMES["q4-a8"]),
    "Q5_0": replace(SCHEMES["q4-a8"], name="q5_0-a8", bits=5),
    "Q4_1": _Q4_1_A8,
    "Q5_1": replace(_Q4_1_A8, name="q5_1-a8", bits=5),
    "Q4_K": replace(_Q4_1_A8, name="q4_k-a8", scale_dtype="uint8", super_group=256),
    "Q5_K": replace(_Q4_1_A8, name="q5_k-a8", bits=5, scale_dtype="uint8", super_group=256),
    "Q6_K": replace(
        SCHEMES["q4-a8"], name="q6_k-a8", bits=6, group_size=16, scale_dtype="int8", super_group=256
    ),
    "Q3_K": replace(
        SCHEMES["q4-a8"], name="q3_k-a8", group_size=16, scale_dtype="int8", super_group=256
    ),
}


def flat_scales(scheme: QuantScheme) -> QuantScheme:
    """A repack as `gguf-a8` stored it before it kept the K-quants' super-blocks and packed 5-
    and 6-bit codes: K-quant scales (and mins) multiplied out into float32 per group, and codes
    of more than 4 bits in int8 (Q4_K 6 bits a weight, Q5_K and Q6_K 10, Q5_0 8.5, Q5_1 9): the
    same numbers, for comparing the kernels."""
    flat = replace(scheme, scale_dtype="float32", super_group=0) if scheme.super_group else scheme
    return flat if scheme.bits == 4 else replace(flat, bits=8, storage_dtype="int8")


def repack_gguf(scheme: QuantScheme, ggml_type: str, raw: np.ndarray, k: int) -> list[np.ndarray]:
    """The parts of `scheme` (A8_REPACKS[ggml_type], or its `flat_scales`) holding raw GGUF rows
    [N, K/B * bytes] exactly: the blocks' codes and scales moved, nothing rounded (K-quants keep
    their integer scales and fp16 d per super-block, or multiply them out: Q4_K's scale and min
    d * sc and -dmin * m, products of an fp16 and a 6-bit integer, exact in float32; Q6_K's
    scale d * sc of an fp16 and an int8)."""
    gguf = GGUF_SCHEMES[ggml_type]
    n = raw.shape[0]
    b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n, k // gguf.group_size, -1)
    supers = []  # with super_group: d (and -dmin) per block, float16 as stored
    if ggml_type == "Q8_0":
        codes, scale, low = b[..., 2:].view(np.int8), _f16(b[..., :2]), None
    elif ggml_type in ("Q4_0", "Q4_1"):
        codes, scale = _nibbles(b[..., 4 if ggml_type == "Q4_1" else 2 :]), _f16(b[..., :2])
        low = _f16(b[..., 2:4]) if ggml_type == "Q4_1" else None
    elif ggml_type == "Q5_0":  # unsigned codes q as the file's (int8: q - 16)
        codes, scale, low = _nibbles(b[..., 6:]) + _high_bits(b[..., 2:6]), _f16(b[..., :2]), None
        if scheme.storage_dtype == "int8":
            codes = codes - 16
    elif ggml_type == "Q5_1":
        codes, scale = _nibbles(b[..., 8:]) + _high_bits(b[..., 4:8]), _f16(b[..., :2])
        low = _f16(b[..., 2:4])
    elif ggml_type in ("Q6_K", "Q3_K"):  # 16 scales per block of 256, in their values' order
        codes, sc, d = (_q6_k_parts if ggml_type == "Q6_K" else _q3_k_parts)(b)
        scale, low = d * sc, None
        if scheme.storage_dtype == "uint32":  # unsigned as the kernel takes them: q + 2^(bits-1)
            codes = codes.astype(np.int16) + (1 << (scheme.bits - 1))
        if scheme.super_group:
            scale, supers = sc, [d]
    else:  # Q4_K / Q5_K: 8 sub-blocks of 32 per block of 256
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        sc, mn = _k_scales(b[..., 4:16])
        qs = b[..., 16:144] if ggml_type == "Q4_K" else b[..., 48:176]
        q = qs.reshape(n, -1, 4, 1, 32)  # [n, block, chunk c, 1, l]
        codes = np.concatenate([q & 0xF, q >> 4], axis=-2)  # sub-block 2c + half
        if ggml_type == "Q5_K":  # bit 2c + half of qh[l]
            shifts = np.arange(8, dtype=np.uint8).reshape(4, 2, 1)
            codes = codes + ((b[..., 16:48][..., None, None, :] >> shifts) & 1) * 16
        scale, low = d * sc, -(dmin * mn)
        if scheme.super_group:  # -dmin: the kernel adds m * (-dmin) as the group's min
            scale, low, supers = np.stack([sc, mn], axis=-1), None, [np.stack([d, -dmin], -1)]
    codes = np.ascontiguousarray(codes.reshape(n, k))
    if scheme.storage_dtype == "int8":
        words = codes.astype(np.int8).view(np.uint32)  # 4 k per word, tiled as words
    else:
        words = _pack_row_codes(codes.astype(np.uint32), scheme.bits)
    parts = [words, scale] if low is None else [words, scale, low]
    parts = [parts[0]] + [p.reshape(n, -1).astype(scheme.scale_dtype) for p in parts[1:]]
    parts += [p.reshape(n, -1).astype(np.float16) for p in supers]  # exact: read from fp16
    if scheme.tiled(n):
        parts = [_to_tiles(p, scheme.row_tile) for p in parts]
    if scheme.storage_dtype == "int8":
        parts[0] = parts[0].view(np.int8)
    return parts


def resolve_scheme(name: str) -> QuantScheme | None:
    if name not in SCHEMES:
        raise RelaxlmError(
            f"quantization {name!r} is not supported; use one of {', '.join(SCHEMES)} "
            f"(GGUF files keep their own llama.cpp formats; {GGUF_A8} computes their 4- to "
            "8-bit blocks with int8 activations)"
        )
    return SCHEMES[name]


ROWS_PER_CHUNK_ELEMENTS = 1 << 22  # rows are packed in chunks of ~4M values: bounded temporaries


def quantize(scheme: QuantScheme, weight: np.ndarray, compute_dtype: np.dtype) -> list[np.ndarray]:
    """Pack a float weight [N, K]; the parts in `part_shapes` order."""
    rows = max(1, ROWS_PER_CHUNK_ELEMENTS // max(1, weight.shape[1]))
    tiled = scheme.tiled(weight.shape[0])
    if tiled:  # chunks of whole tiles
        rows = max(1, rows // scheme.row_tile) * scheme.row_tile
    if weight.shape[0] <= rows:
        return _quantize_rows(scheme, weight, compute_dtype, tiled)
    chunks = [
        _quantize_rows(scheme, weight[i : i + rows], compute_dtype, tiled)
        for i in range(0, weight.shape[0], rows)
    ]
    return [np.concatenate(parts) for parts in zip(*chunks, strict=True)]


def _quantize_rows(
    scheme: QuantScheme, weight: np.ndarray, compute_dtype, tiled: bool = False
) -> list[np.ndarray]:
    if scheme.kind == QuantKind.GGUF:
        raise RelaxlmError(
            f"{scheme.name}: relaxlm keeps llama.cpp's blocks but does not make them; "
            "quantize with llama.cpp or pick one of " + ", ".join(SCHEMES)
        )
    if scheme.kind == QuantKind.CAST:
        return [weight.astype(np.float32).astype(_np_dtype(scheme.storage_dtype))]
    only_repacks = scheme.super_group or (not scheme.symmetric and scheme.row_tile)
    assert not only_repacks, f"{scheme.name} only repacks GGUF blocks"
    w = weight.astype(np.float32)
    n, k = w.shape
    kp = scheme.padded_k(k)
    w = np.pad(w, ((0, 0), (0, kp - k)))  # zeros quantize exactly, to 0 or to the zero point
    groups = w.reshape(n, kp // scheme.group_size, scheme.group_size)
    levels = (1 << scheme.bits) - 1
    if scheme.symmetric:
        half = 1 << (scheme.bits - 1)  # 128 or 8: values in [-half, half - 1]
        scale, q = _symmetric_codes(groups, half, scheme.scale_dtype_for(compute_dtype))
        if scheme.storage_dtype == "int8":
            q = q.reshape(n, kp).astype(np.int8)
            if not tiled:
                return [q, scale]
            words = _to_tiles(q.view(np.uint32), scheme.row_tile)  # 4 k per word
            return [words.view(np.int8), _to_tiles(scale, scheme.row_tile)]
        codes = (q + half).astype(np.uint32).reshape(n, kp)
        if scheme.row_tile:
            words = _pack_row_codes(codes, scheme.bits)
            if not tiled:
                return [words, scale]
            return [_to_tiles(words, scheme.row_tile), _to_tiles(scale, scheme.row_tile)]
        return [_pack(codes, scheme.bits), scale]
    lo, hi = groups.min(axis=2), groups.max(axis=2)
    lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)  # keep 0 representable (padding, sparsity)
    scale = (hi - lo) / levels
    scale = np.where(scale == 0, 1.0, scale).astype(compute_dtype)
    zero = np.clip(np.rint(-lo / scale.astype(np.float32)), 0, levels).astype(compute_dtype)
    q = np.rint(groups / scale.astype(np.float32)[..., None] + zero.astype(np.float32)[..., None])
    codes = np.clip(q, 0, levels).astype(np.uint32).reshape(n, kp)
    return [_pack(codes, scheme.bits), scale, zero]


SCALE_STEPS = 6  # candidate scales per sign and group, each 3 % coarser than the last


def _symmetric_codes(groups: np.ndarray, half: int, scale_dtype) -> tuple:
    """Per group, the scale whose codes in [-half, half - 1] give the least squared error
    (of 2 * SCALE_STEPS candidates), and those codes.

    The codes are asymmetric (one more negative level): a candidate's sign puts the group's
    largest magnitude on the negative side, as llama.cpp's Q4_0 does (scale = extreme / -8).
    The finest candidate of each sign maps the group onto [-half - 1/2, half - 1/2] exactly,
    so no value is clipped and every one stays within half a step; coarser ones trade range
    for rounding (as llama.cpp's K-quants search). The plain max |w| / (half - 1) is a
    candidate too, so no group is worse off than with it. On Gaussian weights: 5 % less RMS
    error than llama.cpp's Q4_0 (which may clip) and than its Q8_0.
    """
    top, bottom = groups.max(axis=2), -groups.min(axis=2)
    # (a hair inside the exact bounds, so that float rounding never pushes a value past them)
    positive = np.maximum(top / (half - 0.501), bottom / (half + 0.499))
    negative = -np.maximum(bottom / (half - 0.501), top / (half + 0.499))
    plain = np.maximum(top, bottom) / (half - 1)  # max |w| -> half - 1: never worse than this
    candidates = [plain] + [
        base * (1 + 0.03 * i) for base in (positive, negative) for i in range(SCALE_STEPS)
    ]
    best_scale = best_q = best_err = None
    for candidate in candidates:
        scale = _away_from_zero(np.where(candidate == 0, 1.0, candidate), scale_dtype)
        s32 = scale.astype(np.float32)[..., None]
        q = np.clip(np.rint(groups / s32), -half, half - 1)
        err = np.square(q * s32 - groups).sum(axis=2)
        if best_err is None:
            best_scale, best_q, best_err = scale, q, err
            continue
        better = err < best_err
        best_scale = np.where(better, scale, best_scale)
        best_q = np.where(better[..., None], q, best_q)
        best_err = np.minimum(err, best_err)
    return best_scale, best_q


def _away_from_zero(scale: np.ndarray, dtype) -> np.ndarray:
    """`scale` in `dtype`, rounded away from zero (a float16 scale rounded down could push the
    group's extreme value past the last level)."""
    rounded = scale.astype(dtype)
    short = np.abs(rounded.astype(np.float64)) < np.abs(scale)
    return np.where(short, np.nextafter(rounded, np.copysign(np.inf, scale).astype(dtype)), rounded)


def dequantize(scheme: QuantScheme, parts: list[np.ndarray], k: int) -> np.ndarray:
    """The float32 weight [N, K] the kernels compute with (numpy reference)."""
    if scheme.kind == QuantKind.CAST:
        return parts[0].astype(np.float32)
    if scheme.kind == QuantKind.GGUF:
        return dequantize_gguf(scheme, parts[0], k)
    q, scale = parts[0], group_scales(scheme, parts)
    n = q.shape[0]
    if scheme.storage_dtype == "int8":
        if scheme.tiled(n):
            q = _from_tiles(q.view(np.uint32), scheme.row_tile).view(np.int8)
        codes = q.astype(np.float32)
    elif scheme.row_tile:
        words = _from_tiles(q, scheme.row_tile) if scheme.tiled(n) else q
        codes = _unpack_row_codes(words, scheme.bits).astype(np.float32)
        codes -= (1 << (scheme.bits - 1)) if scheme.symmetric else 0
    else:
        codes = _unpack(q, scheme.bits).astype(np.float32)
        if scheme.symmetric:
            codes -= 1 << (scheme.bits - 1)
    groups = codes.reshape(n, -1, scheme.group_size)
    if scheme.row_tile and not scheme.symmetric:  # code * scale + min
        low = group_scales(scheme, parts, mins=True)
        values = groups * scale[..., None] + low[..., None]
        return np.ascontiguousarray(values.reshape(n, -1)[:, :k])
    if not scheme.symmetric:
        groups = groups - parts[2].astype(np.float32)[..., None]
    # contiguous: a [:, :k] view of padded rows trips writers that take the raw buffer
    return np.ascontiguousarray((groups * scale[..., None]).reshape(n, -1)[:, :k])


def group_scales(scheme: QuantScheme, parts: list[np.ndarray], mins: bool = False) -> np.ndarray:
    """The scales (or the mins) of an integer scheme's parts as float32 [N, groups], rows in
    order; with super-blocks, times their d (dmin) as the kernel forms them."""
    n = parts[0].shape[0]

    def rows(a: np.ndarray) -> np.ndarray:
        return (_from_tiles(a, scheme.row_tile) if scheme.tiled(n) else a).astype(np.float32)

    if not scheme.super_group:
        return rows(parts[2] if mins else parts[1])
    per = 1 if scheme.symmetric else 2  # scale and min side by side, d and dmin so
    values, d = rows(parts[1])[:, int(mins) :: per], rows(parts[2])[:, int(mins) :: per]
    return values * np.repeat(d, scheme.super_group // scheme.group_size, axis=1)


def _to_tiles(a: np.ndarray, tile: int) -> np.ndarray:
    """[N, C] rows in order -> the same shape, tile-major (element [r, c] at flat index
    (r // tile * C + c) * tile + r % tile)."""
    n, c = a.shape
    return np.ascontiguousarray(a.reshape(n // tile, tile, c).transpose(0, 2, 1)).reshape(n, c)


def _from_tiles(a: np.ndarray, tile: int) -> np.ndarray:
    n, c = a.shape
    return np.ascontiguousarray(a.reshape(n // tile, c, tile).transpose(0, 2, 1)).reshape(n, c)


def _pack_row_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes of 4 to 6 bits [N, Kp] -> words [N, Kp * bits / 32] for the row-tiled kernel: per
    32 k, the low nibbles as `_pack_octets` packs them, then bits - 4 words of the high bits.
    The kernel builds its operands t = 0 .. 7 (4 bytes each: k = 4t + e, e = 0 .. 3, word t // 2
    of the nibbles, low or high ones) and ORs in the high bits, which sit where one shift and
    mask move them to bit 4 of each byte: bit (t * P) % 8 + i of byte e of plane word
    t * P // 8 (P = bits - 4) is bit 4 + i of code 4t + e."""
    n, kp = codes.shape
    nibbles = _pack_octets(codes & 0xF)
    planes = bits - 4
    if not planes:
        return nibbles
    high = (codes >> 4).reshape(n, kp // 32, 8, 4)  # [n, group, operand t, byte e]
    shifts = (np.arange(8, dtype=np.uint32) * planes % 8)[:, None]  # of operand t in its word
    high = high << shifts  # [n, g, t, e], at its bit in byte e
    word_of = np.arange(8) * planes // 8
    plane_bytes = np.stack(
        [np.bitwise_or.reduce(high[:, :, word_of == p], axis=2) for p in range(planes)], axis=2
    )  # [n, g, plane word, e]
    plane_words = np.bitwise_or.reduce(plane_bytes << (np.arange(4, dtype=np.uint32) * 8), 3)
    words = np.concatenate([nibbles.reshape(n, -1, 4), plane_words.astype(np.uint32)], axis=2)
    return words.reshape(n, -1)


def _unpack_row_codes(words: np.ndarray, bits: int) -> np.ndarray:
    n = words.shape[0]
    planes = bits - 4
    groups = words.reshape(n, -1, 4 + planes)
    codes = _unpack_octets(np.ascontiguousarray(groups[..., :4]).reshape(n, -1))
    if not planes:
        return codes
    plane_bytes = (groups[..., 4:, None] >> (np.arange(4, dtype=np.uint32) * 8)) & 0xFF
    t = np.arange(8)
    high = plane_bytes[:, :, t * planes // 8] >> (t * planes % 8)[:, None].astype(np.uint32)
    high &= (1 << planes) - 1  # [n, g, t, e]
    return codes | (high.reshape(n, -1) << 4)


def _pack_octets(codes: np.ndarray) -> np.ndarray:
    """4-bit codes [N, Kp] -> words [N, Kp/8]: byte e of word w holds k = 8w + e (low nibble)
    and 8w + 4 + e (high nibble)."""
    n, kp = codes.shape
    c = codes.reshape(n, kp // 8, 2, 4)
    octet_bytes = c[:, :, 0] | (c[:, :, 1] << 4)  # [n, w, byte e]
    shifts = np.arange(4, dtype=np.uint32) * 8
    return np.bitwise_or.reduce(octet_bytes << shifts, axis=2).astype(np.uint32)


def _unpack_octets(words: np.ndarray) -> np.ndarray:
    n = words.shape[0]
    octet_bytes = (words[..., None] >> (np.arange(4, dtype=np.uint32) * 8)) & 0xFF  # [n, w, e]
    codes = np.stack([octet_bytes & 0xF, octet_bytes >> 4], axis=2)  # [n, w, half, e]
    return codes.reshape(n, -1)


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


# -- GGUF blocks: llama.cpp's dequantize_row_* (ggml-quants.c) in numpy ---------------------
# Float arithmetic in float32 in llama.cpp's order, so results are bit-identical to its
# reference dequantization (gguf-py's `gguf.quants` is the test oracle).


def dequantize_gguf(scheme: QuantScheme, raw: np.ndarray, k: int) -> np.ndarray:
    """The float32 weight [N, K] that raw GGUF rows [N, K/B * bytes] hold."""
    n = raw.shape[0]
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n, k // scheme.group_size, -1)
    assert blocks.shape[-1] == scheme.block_bytes, (scheme.name, raw.shape, k)
    values = _GGUF_DEQUANTIZE[scheme.ggml_type](blocks)  # [n, blocks, B]
    return values.reshape(n, k)


def _f16(b: np.ndarray) -> np.ndarray:
    """float32 of little-endian fp16 in the last axis (2 bytes), keepdims."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """qs[..., 16] -> [..., 32]: low nibbles are values 0-15, high nibbles 16-31."""
    return np.concatenate([qs & 0xF, qs >> 4], axis=-1).astype(np.float32)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """qh[..., 4] (a little-endian uint32) -> bit j of value j, [..., 32], as 0 or 16."""
    bits = np.unpackbits(qh, axis=-1, bitorder="little")  # [..., 32], bit j = value j
    return bits.astype(np.float32) * 16


def _q8_0(b):
    return b[..., 2:].view(np.int8).astype(np.float32) * _f16(b[..., :2])


def _q4_0(b):
    return (_nibbles(b[..., 2:]) - 8) * _f16(b[..., :2])


def _q4_1(b):
    return _nibbles(b[..., 4:]) * _f16(b[..., :2]) + _f16(b[..., 2:4])


def _q5_0(b):
    return (_nibbles(b[..., 6:]) + _high_bits(b[..., 2:6]) - 16) * _f16(b[..., :2])


def _q5_1(b):
    return (_nibbles(b[..., 8:]) + _high_bits(b[..., 4:8])) * _f16(b[..., :2]) + _f16(b[..., 2:4])


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scales[..., 12] -> (scale, min)[..., 8], 6 bits each (get_scale_min_k4)."""
    s = s.astype(np.uint8)
    lo, mid, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([lo & 63, (hi & 0xF) | ((lo >> 6) << 4)], axis=-1)
    mn = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _k_quant(b, qs: np.ndarray, high: np.ndarray | None):
    """Q4_K / Q5_K: 8 sub-blocks of 32; sub-block 2c / 2c+1 are low / high nibbles of qs[32c:]."""
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    sc, mn = _k_scales(b[..., 4:16])
    q = qs.reshape(*qs.shape[:-1], 4, 1, 32)  # [..., chunk c, 1, l]
    q = np.concatenate([q & 0xF, q >> 4], axis=-2).astype(np.float32)  # [..., c, half, l]
    if high is not None:  # bit 2c + half of qh[l]
        shifts = np.arange(8, dtype=np.uint8).reshape(4, 2, 1)
        q += ((high[..., None, None, :] >> shifts) & 1).astype(np.float32) * 16
    q = q.reshape(*qs.shape[:-1], 8, 32)
    return ((d * sc)[..., None] * q - (dmin * mn)[..., None]).reshape(*qs.shape[:-1], 256)


def _q4_k(b):
    return _k_quant(b, b[..., 16:144], None)


def _q5_k(b):
    return _k_quant(b, b[..., 48:176], b[..., 16:48])


def _q6_k_parts(b) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q6_K blocks [..., 210] -> codes q - 32 int8 [..., 256] in value order, sub-block scales
    float32 [..., 16] (value e's is e // 16: index 8h + 2g + l // 16 of value 128h + 32g + l)
    and d float32 [..., 1]."""
    ql, qh = b[..., 0:128], b[..., 128:192]
    ql = ql.reshape(*ql.shape[:-1], 2, 2, 32)  # [..., half h, (l + 32 * (g & 1)) // 32, l]
    low = np.stack([ql & 0xF, ql >> 4], axis=-3)  # [..., h, g >> 1, g & 1, l]
    low = low.reshape(*ql.shape[:-3], 2, 4, 32)  # [..., h, g, l]
    qh = qh.reshape(*qh.shape[:-1], 2, 1, 32)
    high = (qh >> (2 * np.arange(4, dtype=np.uint8)).reshape(4, 1)) & 3  # [..., h, g, l]
    q = (low | (high << 4)).astype(np.int8) - np.int8(32)
    sc = b[..., 192:208].view(np.int8).astype(np.float32)
    return q.reshape(*b.shape[:-1], 256), sc, _f16(b[..., 208:210])


def _q6_k(b):
    q, sc, d = _q6_k_parts(b)
    values = (d * sc)[..., None] * q.reshape(*q.shape[:-1], 16, 16).astype(np.float32)
    return values.reshape(*b.shape[:-1], 256)


def _two_bit_codes(qs: np.ndarray) -> np.ndarray:
    """Q2_K / Q3_K qs[..., 64] -> 2-bit codes uint8 [..., 256] in value order: value
    128h + 32j + 16s + l is bits 2j of qs[32h + 16s + l]."""
    q = qs.reshape(*qs.shape[:-1], 2, 1, 32)  # [..., half h, 1, 16s + l]
    q = (q >> (2 * np.arange(4, dtype=np.uint8)).reshape(4, 1)) & 3  # [..., h, j, 16s + l]
    return q.reshape(*qs.shape[:-1], 256)


def _q2_k_parts(b) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Q2_K blocks [..., 84] -> codes uint8 [..., 256] in value order, each 16 values' scale
    and min (4-bit integers, float32 [..., 16]) and the block's d and dmin (float32 [..., 1])."""
    scales = b[..., 0:16]
    sc, mn = (scales & 0xF).astype(np.float32), (scales >> 4).astype(np.float32)
    return _two_bit_codes(b[..., 16:80]), sc, mn, _f16(b[..., 80:82]), _f16(b[..., 82:84])


def _q2_k(b):
    q, sc, mn, d, dmin = _q2_k_parts(b)
    q = q.reshape(*q.shape[:-1], 16, 16).astype(np.float32)
    values = (d * sc)[..., None] * q - (dmin * mn)[..., None]
    return values.reshape(*b.shape[:-1], 256)


def _q3_k_parts(b) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q3_K blocks [..., 110] -> codes int8 [..., 256] in -4 .. 3, value order (the 2 low bits
    minus 4 where the value's hmask bit is clear: bit 4h + j of hmask[16s + l]), each 16
    values' 6-bit signed scale (float32 [..., 16]) and d (float32 [..., 1])."""
    hmask, scales = b[..., 0:32], b[..., 96:108]
    high = (hmask[..., None, :] >> np.arange(8, dtype=np.uint8).reshape(8, 1)) & 1  # [..., 8, 32]
    q = _two_bit_codes(b[..., 32:96]).astype(np.int8) - 4 * (1 - high.reshape(*b.shape[:-1], 256))
    # scale i: low nibble of byte i (i < 8) or high nibble of byte i - 8; its 2 high bits at
    # bit 2 (i // 4) of byte 8 + i % 4
    low, top = scales[..., 0:8], scales[..., 8:12]
    low = np.concatenate([low & 0xF, low >> 4], axis=-1)
    top = np.concatenate([(top >> shift) & 3 for shift in (0, 2, 4, 6)], axis=-1)
    sc = (low | (top << 4)).astype(np.int8) - np.int8(32)
    return q.astype(np.int8), sc.astype(np.float32), _f16(b[..., 108:110])


def _q3_k(b):
    q, sc, d = _q3_k_parts(b)
    values = (d * sc)[..., None] * q.reshape(*q.shape[:-1], 16, 16).astype(np.float32)
    return values.reshape(*b.shape[:-1], 256)


_GGUF_DEQUANTIZE = {
    "Q8_0": _q8_0,
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
    "Q3_K": _q3_k,
    "Q2_K": _q2_k,
}
