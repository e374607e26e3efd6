"""CPU attention kernels for the paged KV cache, with sliding windows and logit soft-capping.

TVM 0.27's CPU kernels (`tvm.relax.frontend.nn.llm.kv_cache`) have no soft-capping, mask
sliding windows only in the paged-prefill kernel, that kernel returns NaN for a query that
sees no cached key (a chunk as long as the window), and its decode kernel is serial over heads
with scalar dot products. These replace them, with the same signatures, on every CPU target
(`lower_attention_to_paged_kv`); decode runs (sequence, head) pairs in parallel, in vectors.

Every kernel masks by absolute position: the query at position `qpos` sees the key at `kpos`
iff `kpos <= qpos` (any `kpos` when the softmax scale comes negated: a forward that is one
bidirectional block, see lower_attention_to_paged_kv.py) and, with a window `w`,
`kpos > qpos - w` (transformers' sliding-window mask). Positions come from the cache's own
bookkeeping: `q_rope_position` per query token and `k_rope_pos_offset` per sequence (the
position of the first key the kernel is handed), so the mask holds whichever keys, pages or
sliding-window page table the cache passes in.

Scores follow transformers: `s = q.k * sm_scale`, then `s = cap * tanh(s / cap)` when capped,
then softmax. The log-sum-exp output is in base 2, as the cache's merge kernel expects.
"""

import copy
import math

import tvm

from relaxlm.tvm_api import T, tirx

from .kv_quant import GPU_THREADS, SCALE_BYTES, QuantLayout
from .vector_math import exp2, widest_lanes

PAGE_SIZE = 16  # TVM's CPU kernels and page tables are built for 16-token pages
ROW_TILE = 16  # query rows per prefill task, one AVX-512 register of float32 across them
# keys per online-softmax step: with ROW_TILE, a block's scores are 8 x 16 floats (512 bytes);
# TVM puts scratch under 1 KiB on the stack, where LLVM keeps it in registers
KEY_BLOCK = 8
_LOG2E = math.log2(math.e)
_EMPTY_LSE = -5e4  # log-sum-exp of a row that sees no key: merges with weight 0
_NO_MAX = -3.0e38


def _first_visible(qpos, kbase, window: int):
    """First key index (relative to `kbase`) the query at `qpos` may see."""
    if window <= 0:
        return T.int32(0)
    return T.max(qpos - kbase - window + 1, 0)


def _length_info_buffer(handle, batch_size, sliding_table: bool, elem_offset):
    shape = (3, batch_size) if sliding_table else (batch_size,)
    return T.match_buffer(handle, shape, "int32", elem_offset=elem_offset)


def _kv_len(num_pages, b, length_info, sliding_table: bool):
    """Keys in sequence b's page list: full pages, the last page's fill, less the window start."""
    if not sliding_table:
        return (num_pages - 1) * PAGE_SIZE + length_info[b]
    # length_info rows: last page fill, sliding-window start offset, attention-sink length
    return (num_pages - 1) * PAGE_SIZE + length_info[0, b] - length_info[1, b] + length_info[2, b]


def _slot(col, b, length_info, sliding_table: bool):
    """Slot of key `col` counted from the first listed page (skips the window start offset)."""
    if not sliding_table:
        return col
    return T.if_then_else(col < length_info[2, b], col, col - length_info[2, b] + length_info[1, b])


class _KVSource:
    """Where a kernel reads keys and values: `row(j)` locates key j once per key, `key(row, x)`
    and `value(row, x)` read from there, in kv head `head`; `for_query_head(h)` is the source
    for query head h (heads in groups of `group` share a kv head)."""

    head = None
    group = 1

    def for_query_head(self, h):
        source = copy.copy(self)
        source.head = h // self.group
        return source

    def scale_key(self, dot, row):
        """A dot product of q with key `row`'s stored elements, as with the key itself."""
        return dot

    def scale_value(self, weight, row):
        """The weight of value `row`'s stored elements in the output."""
        return weight


class _RaggedKV(_KVSource):
    """Keys and values of this forward: rows base + j of k and v."""

    def __init__(self, k, v, base, group):
        self.k, self.v, self.base, self.group = k, v, base, group

    def row(self, j):
        return self.base + j

    def key(self, row, x):
        return self.k[row, self.head, x]

    def value(self, row, x):
        return self.v[row, self.head, x]


class _PagedKV(_KVSource):
    """Keys and values in sequence b's pages: key j's row is its page times PAGE_SIZE plus its
    place in the page (see `_slot`)."""

    def __init__(self, pages, page_values, page_begin, length_info, b, group, sliding_table):
        self.pages, self.page_values, self.page_begin = pages, page_values, page_begin
        self.length_info, self.b, self.group, self.sliding = length_info, b, group, sliding_table

    def row(self, j):
        slot = _slot(j, self.b, self.length_info, self.sliding)
        return self.page_values[self.page_begin + slot // PAGE_SIZE] * PAGE_SIZE + slot % PAGE_SIZE

    def key(self, row, x):
        return self.pages[row // PAGE_SIZE, 0, self.head, row % PAGE_SIZE, x]

    def value(self, row, x):
        return self.pages[row // PAGE_SIZE, 1, self.head, row % PAGE_SIZE, x]


def _row_scale(scales, flat_row, d: int):
    """The float16 scale of a packed K/V row (its codes, then the scale: kv_quant.py)."""
    return T.cast(scales[flat_row * ((d + SCALE_BYTES) // 2) + d // 2], "float32")


def _decode_e4m3(code):
    """float32 of float8 e4m3 codes held as int8 (a scalar or a vector), in integer operations
    that stay in vector lanes (LLVM lowers an fp8 cast lane by lane). No NaN: codes saturate."""
    lanes = tvm.DataType(code.ty.dtype).lanes
    i32, f32 = ("int32", "float32") if lanes == 1 else (f"int32x{lanes}", f"float32x{lanes}")
    bits = T.cast(code, i32) & 0xFF
    magnitude = bits & 0x7F  # exponent (4 bits, bias 7) and mantissa (3 bits)
    sign = (bits & 0x80) << 24
    # normal: the exponent and mantissa moved under float32's, the bias raised by 127 - 7
    normal = T.reinterpret(f32, sign | ((magnitude << 20) + (120 << 23)))
    # subnormal (exponent 0): mantissa * 2**-9
    subnormal = T.cast(magnitude, f32) * T.float32(2.0**-9) * T.cast(1 - (bits >> 6 & 2), f32)
    return T.Select(magnitude >= 8, normal, subnormal)


def _plain(code):
    return code


class _QuantRaggedKV(_RaggedKV):
    """Quantized keys and values of this forward: codes in k and v, a scale per row."""

    def __init__(self, k, v, k_scales, v_scales, base, group, h_kv, d, decode=_plain):
        super().__init__(k, v, base, group)
        self.k_scales, self.v_scales, self.h_kv, self.d = k_scales, v_scales, h_kv, d
        self.decode = decode

    def key(self, row, x):
        return self.decode(super().key(row, x))

    def value(self, row, x):
        return self.decode(super().value(row, x))

    def scale_key(self, dot, row):
        return dot * _row_scale(self.k_scales, row * self.h_kv + self.head, self.d)

    def scale_value(self, weight, row):
        return weight * _row_scale(self.v_scales, row * self.h_kv + self.head, self.d)


class _QuantPagedKV(_PagedKV):
    """Quantized keys and values in sequence b's pages: codes, a scale per row."""

    def __init__(
        self,
        pages,
        scales,
        page_values,
        page_begin,
        length_info,
        b,
        group,
        sliding,
        h_kv,
        d,
        decode,
    ):
        super().__init__(pages, page_values, page_begin, length_info, b, group, sliding)
        self.scales, self.h_kv, self.d, self.decode = scales, h_kv, d, decode

    def key(self, row, x):
        return self.decode(super().key(row, x))

    def value(self, row, x):
        return self.decode(super().value(row, x))

    def _flat_row(self, row, which: int):
        # pages [page, k/v, kv head, slot, row bytes]
        page, slot = row // PAGE_SIZE, row % PAGE_SIZE
        return ((page * 2 + which) * self.h_kv + self.head) * PAGE_SIZE + slot

    def scale_key(self, dot, row):
        return dot * _row_scale(self.scales, self._flat_row(row, 0), self.d)

    def scale_value(self, weight, row):
        return weight * _row_scale(self.scales, self._flat_row(row, 1), self.d)


class _Io:
    """The buffers a kernel is handed: in the model's dtype, or (`layout` set) a quantized
    cache's packed bytes (compiler/kv_quant.py): q and the output viewed back in the model's
    dtype, K and V as codes with a float16 scale per row."""

    def __init__(self, h_q: int, h_kv: int, d: int, dtype: str, layout: QuantLayout | None):
        self.h_q, self.h_kv, self.d, self.dtype, self.layout = h_q, h_kv, d, dtype, layout
        self.buffer_dtype = dtype if layout is None else "int8"
        self.row = d if layout is None else layout.row_bytes
        self.q_rows = h_q if layout is None else layout.q_rows

    def q_shape(self, n):
        return (n, self.q_rows, self.row)

    def lse_shape(self, n):
        return (n, self.q_rows)

    def kv_shape(self, n):
        return (n, self.h_kv, self.row)

    def page_shape(self, n):
        return (n, 2, self.h_kv, PAGE_SIZE, self.row)

    def values(self, buf, n):
        """q or the output as [n, h_q, d] of the model's dtype."""
        if self.layout is None:
            return buf
        elems = self.layout.q_rows * self.row // self.layout.itemsize
        return T.decl_buffer(
            (n, self.h_q, self.d), self.dtype, data=buf.data, strides=(elems, self.d, 1)
        )

    def codes(self, buf):
        """K/V rows or pages as their codes: int8 bytes (float8 ones decoded by the sources)."""
        return buf

    @property
    def decode(self):
        fp8 = self.layout is not None and self.layout.quant.codes != "int8"
        return _decode_e4m3 if fp8 else _plain

    def scales(self, buf, size):
        """A buffer of `size` bytes as float16 (unused without quantization)."""
        if self.layout is None:
            return buf
        return T.decl_buffer((size // 2,), "float16", data=buf.data)

    def ragged(self, k, v, k_scales, v_scales, base, group):
        if self.layout is None:
            return _RaggedKV(k, v, base, group)
        return _QuantRaggedKV(k, v, k_scales, v_scales, base, group, self.h_kv, self.d, self.decode)

    def paged(self, pages, scales, page_values, page_begin, length_info, b, group, sliding):
        if self.layout is None:
            return _PagedKV(pages, page_values, page_begin, length_info, b, group, sliding)
        return _QuantPagedKV(
            pages,
            scales,
            page_values,
            page_begin,
            length_info,
            b,
            group,
            sliding,
            self.h_kv,
            self.d,
            self.decode,
        )


class _Attention:
    """What a kernel's every task shares: where results go (`output`, `lse`), how scores are
    made (`sm_scale`, `softcap`, `window`) and the head shape (`d`, `dtype`)."""

    def __init__(
        self, output, lse, sm_scale, softcap: float, window: int, d: int, dtype: str, gpu=False
    ):
        # A negative scale (lower_attention_to_paged_kv): the forward is one bidirectional
        # block, whose tokens all see each other.
        self.output, self.lse, self.sm_scale = output, lse, T.abs(sm_scale)
        self.bidirectional = sm_scale < T.float32(0)
        self.softcap, self.window, self.d, self.dtype = softcap, window, d, dtype
        # vector width of dot products and output updates: the widest that divides d on CPUs;
        # a GPU thread works on scalars (its parallelism is across threads)
        self.lanes = 1 if gpu else widest_lanes(d)
        self.gpu = gpu
        # a GPU thread's scratch lives in its registers
        self.scratch = "local" if gpu else "global"

    def head_loop(self, extent: int):
        """The loop over head dimensions: in vectors on CPUs, serial in a GPU thread."""
        return T.serial(extent) if self.gpu else T.vectorized(extent)

    def exp2(self, x: tirx.Expr) -> tirx.Expr:
        """2**x: relaxlm's vectorizable polynomial on CPUs, the hardware's on GPUs."""
        return T.exp2(x) if self.gpu else exp2(x)

    def end(self, qpos, kbase, num_kv):
        """One past the last key index (relative to `kbase`) the query at `qpos` may see."""
        return T.if_then_else(self.bidirectional, num_kv, T.min(num_kv, qpos - kbase + 1))

    def q_scale(self):
        """Factor applied to q: the base-2 scale folds into it without soft-capping; with it,
        tanh needs the natural logit (`score` applies the rest)."""
        if self.softcap > 0:
            return self.sm_scale
        return self.sm_scale * T.float32(_LOG2E)

    def score(self, dot: tirx.Expr) -> tirx.Expr:
        """Base-2 score from a dot product with the scaled q."""
        if self.softcap > 0:
            return T.tanh(dot / T.float32(self.softcap)) * T.float32(self.softcap * _LOG2E)
        return dot


def _vector(base, lanes: int):
    """Index of `lanes` consecutive elements from base (a scalar index when lanes is 1)."""
    return T.ramp(base, 1, lanes) if lanes > 1 else base


def _horizontal_sum(v, lanes: int):
    """The sum of a vector's lanes as a tree of shuffles and adds (a serial float sum of the
    lanes is a chain of `lanes` dependent adds)."""
    while lanes > 1:
        half = lanes // 2
        v = T.Shuffle([v], list(range(half))) + T.Shuffle([v], list(range(half, lanes)))
        lanes = half
    return v


def _key_dot(q_val, kv, at, lanes: int, d: int):
    """q_val . key `at` of `kv` as one expression: lane-wise products summed over the head dims
    in `lanes`-wide vectors, then across the lanes."""
    vector_dtype = f"float32x{lanes}" if lanes > 1 else "float32"
    products = [
        q_val[_vector(x, lanes)] * T.Cast(vector_dtype, kv.key(at, _vector(x, lanes)))
        for x in range(0, d, lanes)
    ]
    total = products[0]
    for p in products[1:]:
        total = total + p
    return _horizontal_sum(total, lanes)


@T.macro(hygienic=False)
def _attend_row(q, row, h, kv, lo, hi, att):
    """output[row, h] and lse[row, h]: online softmax of query q[row, h] over keys lo .. hi - 1
    of `kv` (_RaggedKV, _PagedKV), key by key: each dot product is one vector expression
    folded by a shuffle tree. (Blocks of keys with a lane-wise softmax ran faster with the
    cache warm but slower from DRAM, as in a model: 132 vs 74-83 us for 256 keys x 12 heads.)
    `att` is the kernel's _Attention. Call inside an opaque block (it allocates its scratch)."""
    o_acc = T.sblock_alloc_buffer((1, att.d), "float32", scope=att.scratch)  # unnormalised output
    q_val = T.sblock_alloc_buffer((att.d,), "float32", scope=att.scratch)
    at = T.sblock_alloc_buffer((1,), "int32", scope=att.scratch)
    # running max, sum of weights; scratch: score, new max, rescale, weight
    state = T.sblock_alloc_buffer((6,), "float32", scope=att.scratch)
    state[0] = T.float32(_NO_MAX)
    state[1] = T.float32(0)
    for x in att.head_loop(att.d):
        o_acc[0, x] = T.float32(0)
        q_val[x] = T.cast(q[row, h, x], "float32") * att.q_scale()
    for j in T.serial(T.max(hi - lo, 0)):
        at[0] = kv.row(lo + j)
        state[2] = att.score(kv.scale_key(_key_dot(q_val, kv, at[0], att.lanes, att.d), at[0]))
        state[3] = T.max(state[0], state[2])
        state[4] = att.exp2(state[0] - state[3])
        state[5] = att.exp2(state[2] - state[3])
        state[1] = state[1] * state[4] + state[5]
        state[0] = state[3]
        for x in att.head_loop(att.d):
            o_acc[0, x] = o_acc[0, x] * state[4] + kv.scale_value(state[5], at[0]) * T.cast(
                kv.value(at[0], x), "float32"
            )
    state[4] = T.if_then_else(state[1] > 0, T.float32(1) / state[1], T.float32(0))
    _write_row(att, row, h, o_acc, 0, state[4], state[0], state[1])


@T.macro(hygienic=False)
def _attend_tile(q, first, count, h, kv, positions, kbase, num_kv, att):
    """output and lse of query rows first .. first + count - 1 (count <= ROW_TILE), head h.

    The tile's rows sit in vector lanes: a key's scores for all of them are one FMA per head dim
    with the key's element broadcast, so keys are never transposed and the online softmax over
    each block of KEY_BLOCK keys is lane-wise (max, exp2, sums) — no horizontal reductions.
    `kv` is a key source (_RaggedKV, _PagedKV), `positions` the rows' absolute positions,
    `kbase` the first key's, `att` the kernel's _Attention. Call inside an opaque block (it
    allocates its scratch)."""
    d = T.meta_var(att.d)
    q_t = T.sblock_alloc_buffer((d, ROW_TILE), "float32")  # the tile's queries, transposed
    o_acc = T.sblock_alloc_buffer((ROW_TILE, d), "float32")  # unnormalised outputs
    row_max = T.sblock_alloc_buffer((ROW_TILE,), "float32")
    row_sum = T.sblock_alloc_buffer((ROW_TILE,), "float32")
    row_lo = T.sblock_alloc_buffer((ROW_TILE,), "int32")  # each row sees keys lo .. hi - 1
    row_hi = T.sblock_alloc_buffer((ROW_TILE,), "int32")
    new_max = T.sblock_alloc_buffer((ROW_TILE,), "float32")
    rescale = T.sblock_alloc_buffer((ROW_TILE,), "float32")
    score = T.sblock_alloc_buffer((KEY_BLOCK, ROW_TILE), "float32")  # then the weights
    key_at = T.sblock_alloc_buffer((KEY_BLOCK,), "int32")
    # A pair of output rows being updated (apart: a buffer under 1 KiB stays on the stack)
    out_a = T.sblock_alloc_buffer((d,), "float32")
    out_b = T.sblock_alloc_buffer((d,), "float32")
    span = T.sblock_alloc_buffer((2,), "int32")  # keys any row of the tile sees
    span[0] = num_kv
    span[1] = 0
    for r in T.serial(ROW_TILE):
        # Lanes past `count` see no key: their weights stay 0 and nothing is written for them.
        row_lo[r] = 0
        row_hi[r] = 0
        if r < count:
            row_lo[r] = _first_visible(positions[first + r], kbase, att.window)
            row_hi[r] = att.end(positions[first + r], kbase, num_kv)
            span[0] = T.min(span[0], row_lo[r])
            span[1] = T.max(span[1], row_hi[r])
        row_max[r] = T.float32(_NO_MAX)
        row_sum[r] = T.float32(0)
        for x in T.vectorized(d):
            o_acc[r, x] = T.float32(0)
    for x in T.serial(d):
        for r in T.vectorized(ROW_TILE):
            q_t[x, r] = T.Select(
                r < count,
                T.cast(q[first + T.min(r, count - 1), h, x], "float32") * att.q_scale(),
                T.float32(0),
            )
    for blk in T.serial(T.max(span[1] - span[0] + KEY_BLOCK - 1, 0) // KEY_BLOCK):
        j0: T.let[T.int32] = span[0] + blk * KEY_BLOCK
        for jj in T.serial(KEY_BLOCK):
            key_at[jj] = kv.row(T.min(j0 + jj, span[1] - 1))  # past the end: masked below
            for r in T.vectorized(ROW_TILE):
                score[jj, r] = T.float32(0)
        for x in T.serial(d):
            for jj in T.unroll(KEY_BLOCK):
                for r in T.vectorized(ROW_TILE):
                    score[jj, r] += q_t[x, r] * T.cast(kv.key(key_at[jj], x), "float32")
        for r in T.vectorized(ROW_TILE):
            new_max[r] = row_max[r]
        for jj in T.unroll(KEY_BLOCK):
            for r in T.vectorized(ROW_TILE):
                score[jj, r] = T.Select(
                    row_lo[r] <= j0 + jj and j0 + jj < row_hi[r],
                    att.score(kv.scale_key(score[jj, r], key_at[jj])),
                    T.float32(_NO_MAX),
                )
                new_max[r] = T.max(new_max[r], score[jj, r])
        for r in T.vectorized(ROW_TILE):
            rescale[r] = exp2(row_max[r] - new_max[r])
            row_sum[r] = row_sum[r] * rescale[r]
            row_max[r] = new_max[r]
        for jj in T.unroll(KEY_BLOCK):
            for r in T.vectorized(ROW_TILE):
                score[jj, r] = T.Select(
                    row_lo[r] <= j0 + jj and j0 + jj < row_hi[r],
                    exp2(score[jj, r] - new_max[r]),
                    T.float32(0),
                )
                row_sum[r] += score[jj, r]
        # Two rows at a time: twice the independent FMA chains. Lanes past `count` have weight
        # 0, so an odd count's extra row only updates scratch.
        for pair in T.serial((count + 1) // 2):
            for x in T.vectorized(d):
                out_a[x] = o_acc[2 * pair, x] * rescale[2 * pair]
                out_b[x] = o_acc[2 * pair + 1, x] * rescale[2 * pair + 1]
            for jj in T.serial(KEY_BLOCK):
                for x in T.vectorized(d):
                    out_a[x] += kv.scale_value(score[jj, 2 * pair], key_at[jj]) * T.cast(
                        kv.value(key_at[jj], x), "float32"
                    )
                    out_b[x] += kv.scale_value(score[jj, 2 * pair + 1], key_at[jj]) * T.cast(
                        kv.value(key_at[jj], x), "float32"
                    )
            for x in T.vectorized(d):
                o_acc[2 * pair, x] = out_a[x]
                o_acc[2 * pair + 1, x] = out_b[x]
    for r in T.serial(count):
        rescale[r] = T.if_then_else(row_sum[r] > 0, T.float32(1) / row_sum[r], T.float32(0))
        _write_row(att, first + r, h, o_acc, r, rescale[r], row_max[r], row_sum[r])


@T.macro(hygienic=False)
def _write_row(att, row, h, o_acc, acc_row, inverse_sum, row_max, row_sum):
    """output[row, h] = o_acc[acc_row] * inverse_sum, and lse[row, h] from the running max and
    sum of weights (base 2; a row that saw no key gets a weightless lse)."""
    for x in att.head_loop(att.d):
        att.output[row, h, x] = T.cast(o_acc[acc_row, x] * inverse_sum, att.dtype)
    att.lse[row, h] = T.if_then_else(row_sum > 0, row_max + T.log2(row_sum), T.float32(_EMPTY_LSE))


@T.macro(hygienic=False)
def _prefill_sequence(q, first, num_q, h_q, kv, positions, kbase, num_kv, att):
    """Attention of one sequence's num_q new rows (from row `first`) over the keys of `kv`:
    a task per (tile of ROW_TILE rows, query head)."""
    for task in T.parallel((num_q + ROW_TILE - 1) // ROW_TILE * h_q):
        with T.sblock("attn"):
            # Regions depend on values read inside the block: declare it opaque.
            T.reads()
            T.writes()
            tile: T.let[T.int32] = _balanced_tile(task // h_q, (num_q + ROW_TILE - 1) // ROW_TILE)
            _attend_tile(
                q,
                first + tile * ROW_TILE,
                T.min(ROW_TILE, num_q - tile * ROW_TILE),
                task % h_q,
                kv.for_query_head(task % h_q),
                positions,
                kbase,
                num_kv,
                att,
            )


def _balanced_tile(task_row: tirx.Expr, num_tiles: tirx.Expr) -> tirx.Expr:
    """Tile of the task_row-th task: 0, n-1, 1, n-2, ... so each thread's contiguous share of
    the tasks (TVM splits a parallel loop into equal runs) mixes short causal rows with long."""
    return T.if_then_else(task_row % 2 == 0, task_row // 2, num_tiles - 1 - task_row // 2)


def ragged_prefill(
    num_kv_heads: int,
    num_q_heads: int,
    head_dim: int,
    dtype: str,
    *,
    window: int,
    softcap: float,
    max_chunk: int = 0,
    gpu: bool = False,
    layout: QuantLayout | None = None,
) -> tirx.PrimFunc:
    """Attention among the tokens of this forward (q, k, v laid end to end per sequence).

    max_chunk > 0 makes a sequence with more new tokens than that an error: the kernel is shared
    by all layers, so with per-layer windows it applies none and relies on chunks <= the window.
    """
    group = num_q_heads // num_kv_heads
    h_q, h_kv, d = num_q_heads, num_kv_heads, head_dim
    io = _Io(h_q, h_kv, d, dtype, layout)
    chunk_limit = max_chunk if max_chunk > 0 else 2**30

    @T.prim_func(s_tir=True)
    def attention_prefill_ragged(
        var_q: T.handle,  # [total_q, h_q, d]
        var_q_indptr: T.handle,  # [batch + 1]
        var_k: T.handle,  # [total_kv, h_kv, d]
        var_v: T.handle,  # [total_kv, h_kv, d]
        var_kv_indptr: T.handle,  # [batch + 1]
        var_q_rope_position: T.handle,  # [total_q]
        var_k_rope_pos_offset: T.handle,  # [batch]
        var_output: T.handle,  # [total_q, h_q, d]
        var_lse: T.handle,  # [total_q, h_q]
        causal: T.int32,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True})
        batch_size = T.int32()
        qo_len = T.int32()
        kv_len = T.int32()
        q_indptr_offset = T.int32()
        kv_indptr_offset = T.int32()
        q_pos_offset = T.int32()
        k_pos_offset = T.int32()
        q_in = T.match_buffer(var_q, io.q_shape(qo_len), io.buffer_dtype)
        q_indptr = T.match_buffer(
            var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_offset
        )
        k_in = T.match_buffer(var_k, io.kv_shape(kv_len), io.buffer_dtype)
        v_in = T.match_buffer(var_v, io.kv_shape(kv_len), io.buffer_dtype)
        kv_indptr = T.match_buffer(
            var_kv_indptr, (batch_size + 1,), "int32", elem_offset=kv_indptr_offset
        )
        q_rope_position = T.match_buffer(
            var_q_rope_position, (qo_len,), "int32", elem_offset=q_pos_offset
        )
        k_rope_pos_offset = T.match_buffer(
            var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_pos_offset
        )
        output_in = T.match_buffer(var_output, io.q_shape(qo_len), io.buffer_dtype)
        lse = T.match_buffer(var_lse, io.lse_shape(qo_len), "float32")
        q = io.values(q_in, qo_len)
        output = io.values(output_in, qo_len)
        k = io.codes(k_in)
        v = io.codes(v_in)
        k_scales = io.scales(k_in, kv_len * h_kv * io.row)
        v_scales = io.scales(v_in, kv_len * h_kv * io.row)
        assert rotary_mode == 0, "relaxlm attention kernels do not apply RoPE inline"

        if gpu:  # no chunk check: a GPU kernel cannot assert (the manifest caps the chunk)
            _gpu_attend_rows(
                q,
                qo_len,
                h_q,
                batch_size,
                q_indptr,
                q_rope_position,
                k_rope_pos_offset,
                _RaggedSequences(io, k, v, k_scales, v_scales, kv_indptr, group),
                _Attention(output, lse, sm_scale, softcap, window, d, dtype, gpu=True),
            )
        else:
            # Sequences one after another; within one, a task per (tile of query rows, head).
            for b in T.serial(batch_size):
                assert q_indptr[b + 1] - q_indptr[b] <= chunk_limit, (
                    "relaxlm: a sequence got more new tokens in one forward than its "
                    "sliding window; prefill in chunks no longer than the window "
                    "(manifest prefill_chunk_size)"
                )
                _prefill_sequence(
                    q,
                    q_indptr[b],
                    q_indptr[b + 1] - q_indptr[b],
                    h_q,
                    io.ragged(k, v, k_scales, v_scales, kv_indptr[b], group),
                    q_rope_position,
                    k_rope_pos_offset[b],
                    kv_indptr[b + 1] - kv_indptr[b],
                    _Attention(output, lse, sm_scale, softcap, window, d, dtype),
                )

    return attention_prefill_ragged


def paged_prefill(
    num_kv_heads: int,
    num_q_heads: int,
    head_dim: int,
    dtype: str,
    *,
    window: int,
    softcap: float,
    sliding_table: bool,
    gpu: bool = False,
    layout: QuantLayout | None = None,
) -> tirx.PrimFunc:
    """New tokens against the keys already in the cache's pages.

    sliding_table: the cache hands this kernel a sliding-window page table (layers of kind
    `mha_sliding`: length info is [3, batch] and the first page starts at an offset).
    """
    group = num_q_heads // num_kv_heads
    h_q, h_kv, d = num_q_heads, num_kv_heads, head_dim
    io = _Io(h_q, h_kv, d, dtype, layout)

    @T.prim_func(s_tir=True)
    def attention_prefill_paged(
        var_q: T.handle,  # [total_q, h_q, d]
        var_q_indptr: T.handle,  # [batch + 1]
        var_pages: T.handle,  # [max_num_pages, 2, h_kv, page_size, d]
        var_page_indptr: T.handle,  # [batch + 1]
        var_page_values: T.handle,  # [nnz_pages]
        var_length_info: T.handle,  # [batch], or [3, batch] for a sliding-window table
        var_k_rope_pos_offset: T.handle,  # [batch]
        var_q_rope_position: T.handle,  # [total_q]
        var_output: T.handle,  # [total_q, h_q, d]
        var_lse: T.handle,  # [total_q, h_q]
        causal: T.int32,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True})
        batch_size = T.int32()
        total_q = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        q_indptr_offset = T.int32()
        page_indptr_offset = T.int32()
        page_values_offset = T.int32()
        k_pos_offset = T.int32()
        q_pos_offset = T.int32()
        length_info_offset = T.int32()
        q_in = T.match_buffer(var_q, io.q_shape(total_q), io.buffer_dtype)
        q_indptr = T.match_buffer(
            var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_offset
        )
        pages_in = T.match_buffer(var_pages, io.page_shape(max_num_pages), io.buffer_dtype)
        page_indptr = T.match_buffer(
            var_page_indptr, (batch_size + 1,), "int32", elem_offset=page_indptr_offset
        )
        page_values = T.match_buffer(
            var_page_values, (nnz_pages,), "int32", elem_offset=page_values_offset
        )
        length_info = _length_info_buffer(
            var_length_info, batch_size, sliding_table, length_info_offset
        )
        k_rope_pos_offset = T.match_buffer(
            var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_pos_offset
        )
        q_rope_position = T.match_buffer(
            var_q_rope_position, (total_q,), "int32", elem_offset=q_pos_offset
        )
        output_in = T.match_buffer(var_output, io.q_shape(total_q), io.buffer_dtype)
        lse = T.match_buffer(var_lse, io.lse_shape(total_q), "float32")
        q = io.values(q_in, total_q)
        output = io.values(output_in, total_q)
        pages = io.codes(pages_in)
        scales = io.scales(pages_in, max_num_pages * 2 * h_kv * PAGE_SIZE * io.row)
        assert rotary_mode == 0, "relaxlm attention kernels do not apply RoPE inline"

        if gpu:
            _gpu_attend_rows(
                q,
                total_q,
                h_q,
                batch_size,
                q_indptr,
                q_rope_position,
                k_rope_pos_offset,
                _PagedSequences(
                    io, pages, scales, page_values, page_indptr, length_info, group, sliding_table
                ),
                _Attention(output, lse, sm_scale, softcap, window, d, dtype, gpu=True),
            )
        else:
            # As the ragged kernel: a task per (tile of query rows, head) of each sequence.
            for b in T.serial(batch_size):
                num_pages: T.let[T.int32] = page_indptr[b + 1] - page_indptr[b]
                _prefill_sequence(
                    q,
                    q_indptr[b],
                    q_indptr[b + 1] - q_indptr[b],
                    h_q,
                    io.paged(
                        pages,
                        scales,
                        page_values,
                        page_indptr[b],
                        length_info,
                        b,
                        group,
                        sliding_table,
                    ),
                    q_rope_position,
                    k_rope_pos_offset[b],
                    T.if_then_else(
                        num_pages > 0, _kv_len(num_pages, b, length_info, sliding_table), 0
                    ),
                    _Attention(output, lse, sm_scale, softcap, window, d, dtype),
                )

    return attention_prefill_paged


def paged_decode(
    num_kv_heads: int,
    num_q_heads: int,
    head_dim: int,
    dtype: str,
    *,
    window: int,
    softcap: float,
    sliding_table: bool,
    gpu: bool = False,
    layout: QuantLayout | None = None,
) -> tirx.PrimFunc:
    """One new token per sequence against the cache's pages (the token is usually in them)."""
    group = num_q_heads // num_kv_heads
    h_q, h_kv, d = num_q_heads, num_kv_heads, head_dim
    io = _Io(h_q, h_kv, d, dtype, layout)

    @T.prim_func(s_tir=True)
    def attention_decode_paged(
        var_q: T.handle,  # [batch, h_q, d]
        var_pages: T.handle,  # [max_num_pages, 2, h_kv, page_size, d]
        var_page_indptr: T.handle,  # [batch + 1]
        var_page_values: T.handle,  # [nnz_pages]
        var_length_info: T.handle,  # [batch], or [3, batch] for a sliding-window table
        var_k_rope_pos_offset: T.handle,  # [batch]
        var_q_rope_position: T.handle,  # [batch]
        var_output: T.handle,  # [batch, h_q, d]
        var_lse: T.handle,  # [batch, h_q]
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True})
        batch_size = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        page_indptr_offset = T.int32()
        page_values_offset = T.int32()
        k_pos_offset = T.int32()
        q_pos_offset = T.int32()
        length_info_offset = T.int32()
        q_in = T.match_buffer(var_q, io.q_shape(batch_size), io.buffer_dtype)
        pages_in = T.match_buffer(var_pages, io.page_shape(max_num_pages), io.buffer_dtype)
        page_indptr = T.match_buffer(
            var_page_indptr, (batch_size + 1,), "int32", elem_offset=page_indptr_offset
        )
        page_values = T.match_buffer(
            var_page_values, (nnz_pages,), "int32", elem_offset=page_values_offset
        )
        length_info = _length_info_buffer(
            var_length_info, batch_size, sliding_table, length_info_offset
        )
        k_rope_pos_offset = T.match_buffer(
            var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_pos_offset
        )
        q_rope_position = T.match_buffer(
            var_q_rope_position, (batch_size,), "int32", elem_offset=q_pos_offset
        )
        output_in = T.match_buffer(var_output, io.q_shape(batch_size), io.buffer_dtype)
        lse = T.match_buffer(var_lse, io.lse_shape(batch_size), "float32")
        q = io.values(q_in, batch_size)
        output = io.values(output_in, batch_size)
        pages = io.codes(pages_in)
        scales = io.scales(pages_in, max_num_pages * 2 * h_kv * PAGE_SIZE * io.row)
        assert rotary_mode == 0, "relaxlm attention kernels do not apply RoPE inline"

        if gpu:
            _gpu_attend_rows(
                q,
                batch_size,
                h_q,
                batch_size,
                None,
                q_rope_position,
                k_rope_pos_offset,
                _PagedSequences(
                    io, pages, scales, page_values, page_indptr, length_info, group, sliding_table
                ),
                _Attention(output, lse, sm_scale, softcap, window, d, dtype, gpu=True),
            )
        else:
            # One task per (sequence, query head): decode is one query row each, so this is
            # where the parallelism is. Dot products and the output update run in `lanes`-wide
            # vectors (a strict-float reduction would otherwise stay scalar and serial).
            for bh in T.parallel(batch_size * h_q):
                with T.sblock("attn"):
                    # Regions depend on values read inside the block: declare it opaque.
                    T.reads()
                    T.writes()
                    b: T.let[T.int32] = bh // h_q
                    h: T.let[T.int32] = bh % h_q
                    page_begin: T.let[T.int32] = page_indptr[b]
                    num_pages: T.let[T.int32] = page_indptr[b + 1] - page_begin
                    num_kv: T.let[T.int32] = T.if_then_else(
                        num_pages > 0, _kv_len(num_pages, b, length_info, sliding_table), 0
                    )
                    kbase: T.let[T.int32] = k_rope_pos_offset[b]
                    qpos: T.let[T.int32] = q_rope_position[b]
                    lo: T.let[T.int32] = _first_visible(qpos, kbase, window)
                    hi: T.let[T.int32] = T.min(num_kv, qpos - kbase + 1)
                    _attend_row(
                        q,
                        b,
                        h,
                        io.paged(
                            pages,
                            scales,
                            page_values,
                            page_begin,
                            length_info,
                            b,
                            group,
                            sliding_table,
                        ).for_query_head(h),
                        lo,
                        hi,
                        _Attention(output, lse, sm_scale, softcap, window, d, dtype),
                    )

    return attention_decode_paged


# GPU kernels: the same signatures, masks and scores, one GPU thread per (query row, head), each
# running `_attend_row` over its keys in scalars. Correct on every GPU TVM targets, not fast:
# they exist so that models with sliding windows or soft-capping (Gemma 2/3), or a quantized
# KV cache (packed rows read through `_Io`, as on CPUs), which TVM's GPU kernels cannot
# express, run on GPUs at all; other models keep TVM's tiled kernels.


class _RaggedSequences:
    """Sequence b's keys in a ragged prefill: the rows of k and v between kv_indptr[b] and
    kv_indptr[b + 1], read as `io` reads them (quantized rows: codes, scales)."""

    def __init__(self, io, k, v, k_scales, v_scales, kv_indptr, group):
        self.io, self.k, self.v, self.kv_indptr, self.group = io, k, v, kv_indptr, group
        self.k_scales, self.v_scales = k_scales, v_scales

    def keys(self, b):
        return self.io.ragged(
            self.k, self.v, self.k_scales, self.v_scales, self.kv_indptr[b], self.group
        )

    def count(self, b):
        return self.kv_indptr[b + 1] - self.kv_indptr[b]


class _PagedSequences:
    """Sequence b's keys in the cache's pages (its page list and length info), read as `io`
    reads them."""

    def __init__(self, io, pages, scales, page_values, page_indptr, length_info, group, sliding):
        self.io, self.pages, self.scales, self.page_values = io, pages, scales, page_values
        self.page_indptr, self.length_info, self.group, self.sliding = (
            page_indptr,
            length_info,
            group,
            sliding,
        )

    def keys(self, b):
        return self.io.paged(
            self.pages,
            self.scales,
            self.page_values,
            self.page_indptr[b],
            self.length_info,
            b,
            self.group,
            self.sliding,
        )

    def count(self, b):
        num_pages = self.page_indptr[b + 1] - self.page_indptr[b]
        return T.if_then_else(
            num_pages > 0, _kv_len(num_pages, b, self.length_info, self.sliding), 0
        )


@T.macro(hygienic=False)
def _gpu_attend_rows(q, num_rows, h_q, batch_size, q_indptr, positions, k_pos, sequences, att):
    """output and lse of every (query row, head): a thread each. A row's sequence is the last b
    with q_indptr[b] <= row (decode: q_indptr is None and row b is sequence b)."""
    # at least one block: a launch of an empty grid is an error on CUDA
    blocks = T.meta_var(T.max((num_rows * h_q + GPU_THREADS - 1) // GPU_THREADS, 1))
    for bx in T.thread_binding(blocks, "blockIdx.x"):
        for tx in T.thread_binding(GPU_THREADS, "threadIdx.x"):
            with T.sblock("attn"):
                # Regions depend on values read inside the block: declare it opaque.
                T.reads()
                T.writes()
                seq = T.sblock_alloc_buffer((1,), "int32", scope="local")
                if bx * GPU_THREADS + tx < num_rows * h_q:
                    row: T.let[T.int32] = (bx * GPU_THREADS + tx) // h_q
                    h: T.let[T.int32] = (bx * GPU_THREADS + tx) % h_q
                    seq[0] = row
                    if q_indptr is not None:
                        seq[0] = 0
                        for i in T.serial(batch_size - 1):
                            if q_indptr[i + 1] <= row:
                                seq[0] = i + 1
                    kbase: T.let[T.int32] = k_pos[seq[0]]
                    _attend_row(
                        q,
                        row,
                        h,
                        sequences.keys(seq[0]).for_query_head(h),
                        _first_visible(positions[row], kbase, att.window),
                        att.end(positions[row], kbase, sequences.count(seq[0])),
                        att,
                    )
