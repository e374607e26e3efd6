"""GPU kernels that choose next tokens from the logits where they are (issue 18, item 4).

Only the chosen ids (and the chosen token's log-probability) go back to the host, not the
[batch, vocab] logits. The rule is runtime/sampler.py's, which defines it once for numpy too:

- `gather_scores` copies each sampled row of the logits (`rows[b]`: forks share a row) into a
  [batch, vocab] scratch and applies logit bias and penalties, given per token as COO entries
  (row, token, [bias, seen, subtract]) that the host builds from each sequence's counts:
  `s = s + bias`, then for seen tokens the repetition penalty (divide positive scores, multiply
  negative ones), then `s -= subtract` (frequency * count + presence).
- `sample_from_scores` divides by the temperature and keeps the first L tokens in *rank order*
  (score descending, then token id ascending), L the least of: the tokens passing min_p, top_k,
  and the fewest whose mass reaches top_p. Then the inverse-CDF draw: over the kept tokens in
  token-id order, the first whose cumulative probability exceeds `uniform * total`. Greedy is
  top_k = 1 (the host sends it so), which is argmax with the lowest id on ties, as numpy's.
- `token_logprob`: the chosen token's log-probability under the raw logits.

No sort: every cut is found by bisection, each step one block-wide reduction over the row. A
score's rank key is its float32 bits made monotone (`_key`), so a bisection over int32 keys
finds an exact score in 32 steps, and one over token ids breaks ties among equal scores. Each
row is one thread block; every pass runs for every row whatever its parameters, because WGSL
allows a barrier only under control flow that is uniform by its analysis (a value read from a
storage buffer is not), and one kernel serves every GPU target.

Computed in float32 (numpy's sampler works in float64): the two choose the same token except
when a boundary (a cut's mass, the draw's target) falls within float32 rounding of another.
"""

import functools
import math

import tvm
from tvm import relax

from relaxlm.artifacts.sampling import (
    ENTRY_VALUES,
    MIN_P,
    PARAMS,
    REPETITION,
    TEMPERATURE,
    TOP_K,
    TOP_P,
    UNIFORM,
)
from relaxlm.tvm_api import T, tirx

from .launch_limits import thread_limits

_INT_MIN = -2147483647  # below every finite float's key; WGSL cannot write -2**31
KEY_STEPS = 32  # a bisection over every int32 key
MAX_THREADS = 1024  # a block per row: threads * (passes over the row) bounds a row's time


def _key(x):
    """An int32 that orders like the float32 x: its bits, negatives' magnitude bits flipped."""
    bits = T.reinterpret("int32", x)
    return T.if_then_else(bits >= 0, bits, T.bitwise_xor(bits, 0x7FFFFFFF))


def _mid(lo, hi):
    """floor((lo + hi) / 2) without int32 overflow (WGSL has no int64)."""
    return T.shift_right(lo, 1) + T.shift_right(hi, 1) + T.bitwise_and(T.bitwise_and(lo, hi), 1)


@functools.cache  # the TIR takes seconds to build; every GPU library carries it
def sampling_kernels(threads: int, gpu: bool = True) -> dict[str, tirx.PrimFunc]:
    """The three kernels, `threads` (a power of two) per block; name -> PrimFunc.

    gpu=False: the same TIR with the blocks as a serial loop and one thread each, for CPU
    targets (tests run the runtime's kernel path on CPU with it)."""
    assert threads & (threads - 1) == 0 and (gpu or threads == 1), threads
    levels = int(math.log2(threads))
    return {
        "gather_scores": _gather_scores(threads, gpu),
        "sample_from_scores": _sample_from_scores(threads, levels, gpu),
        "sample_unfiltered": _sample_unfiltered(threads, levels, gpu),
        "argmax_scores": _argmax_scores(threads, levels, gpu),
        "token_logprob": _token_logprob(threads, levels, gpu),
    }


def _loop(extent, thread: str, gpu: bool):
    """A loop bound to `thread` on GPUs; serial on CPUs."""
    return T.thread_binding(extent, thread) if gpu else T.serial(extent)


def _sync(gpu: bool):
    """A barrier between a block's threads (none needed with the one thread of a CPU row)."""
    return T.tvm_storage_sync("shared") if gpu else T.int32(0)


def _shared(gpu: bool) -> str:
    return "shared" if gpu else "local"


def _gather_scores(threads: int, gpu: bool):
    @T.prim_func(s_tir=True)
    def gather_scores(
        var_logits: T.handle,  # [num_rows, vocab] float32
        var_rows: T.handle,  # [batch] int32: the logits row each sampled row reads
        var_params: T.handle,  # [batch, PARAMS] float32
        var_entry_rows: T.handle,  # [entries] int32 (at least one; a no-op entry pads)
        var_entry_ids: T.handle,  # [entries] int32
        var_entry_values: T.handle,  # [entries, ENTRY_VALUES] float32
        var_scores: T.handle,  # [batch, vocab] float32, out
    ):
        T.func_attr({"tirx.is_scheduled": True})
        num_rows, vocab, batch, entries = T.int32(), T.int32(), T.int32(), T.int32()
        logits = T.match_buffer(var_logits, (num_rows, vocab), "float32")
        rows = T.match_buffer(var_rows, (batch,), "int32")
        params = T.match_buffer(var_params, (batch, PARAMS), "float32")
        entry_rows = T.match_buffer(var_entry_rows, (entries,), "int32")
        entry_ids = T.match_buffer(var_entry_ids, (entries,), "int32")
        entry_values = T.match_buffer(var_entry_values, (entries, ENTRY_VALUES), "float32")
        scores = T.match_buffer(var_scores, (batch, vocab), "float32")
        # A second launch, so every copy lands before an entry rewrites its token.
        for b in _loop(batch, "blockIdx.x", gpu):
            for tx in _loop(threads, "threadIdx.x", gpu):
                with T.sblock("copy"):
                    T.reads()
                    T.writes()
                    for i in T.serial((vocab + threads - 1) // threads):
                        if i * threads + tx < vocab:
                            scores[b, i * threads + tx] = logits[rows[b], i * threads + tx]
        for bx in _loop((entries + threads - 1) // threads, "blockIdx.x", gpu):
            for tx in _loop(threads, "threadIdx.x", gpu):
                with T.sblock("adjust"):
                    T.reads()
                    T.writes()
                    if bx * threads + tx < entries:
                        e: T.let[T.int32] = bx * threads + tx
                        b: T.let[T.int32] = entry_rows[e]
                        s: T.let[T.float32] = scores[b, entry_ids[e]] + entry_values[e, 0]
                        penalty: T.let[T.float32] = params[b, REPETITION]
                        s2: T.let[T.float32] = T.if_then_else(
                            entry_values[e, 1] > T.float32(0),
                            T.if_then_else(s > T.float32(0), s / penalty, s * penalty),
                            s,
                        )
                        scores[b, entry_ids[e]] = s2 - entry_values[e, 2]

    return gather_scores


@T.macro(hygienic=False)
def _reduce(red, tx, op, threads, levels, gpu):
    """red[0] = op over red[0:threads], a tree in shared memory; every thread then reads it."""
    _sync(gpu)
    for level in T.unroll(levels):
        if tx < T.shift_right(threads, level + 1):
            red[tx] = op(red[tx], red[tx + T.shift_right(threads, level + 1)])
        _sync(gpu)


def _sample_from_scores(threads: int, levels: int, gpu: bool):
    # A token is kept while its (key, id) ranks at or before the cut (si[2], si[3]): _is_kept.
    # si (int32): 0, 1 a bisection's lo and hi, 2 the cut's key, 3 its id, 4 k_eff (the rank
    #   of the top_k / min_p cut), 5 a reduced count
    # sf (float32): 0 the max score, 1 Z2 (mass after min_p and top_k), 2 the mass above the
    #   top_p key, 3 the draw's target, 4 a reduced mass

    @T.prim_func(s_tir=True)
    def sample_from_scores(
        var_scores: T.handle,  # [batch, vocab] float32
        var_params: T.handle,  # [batch, PARAMS] float32
        var_tokens: T.handle,  # [batch] int32, out
    ):
        T.func_attr({"tirx.is_scheduled": True})
        batch, vocab = T.int32(), T.int32()
        scores = T.match_buffer(var_scores, (batch, vocab), "float32")
        params = T.match_buffer(var_params, (batch, PARAMS), "float32")
        tokens = T.match_buffer(var_tokens, (batch,), "int32")
        for b in _loop(batch, "blockIdx.x", gpu):
            for tx in _loop(threads, "threadIdx.x", gpu):
                with T.sblock("row"):
                    T.reads()
                    T.writes()
                    red_f = T.sblock_alloc_buffer((threads,), "float32", scope=_shared(gpu))
                    red_i = T.sblock_alloc_buffer((threads,), "int32", scope=_shared(gpu))
                    si = T.sblock_alloc_buffer((6,), "int32", scope="local")
                    sf = T.sblock_alloc_buffer((6,), "float32", scope="local")
                    acc_f = T.sblock_alloc_buffer((1,), "float32", scope="local")
                    acc_i = T.sblock_alloc_buffer((1,), "int32", scope="local")
                    steps = T.meta_var((vocab + threads - 1) // threads)
                    # bisection steps over token ids [0, vocab): ceil(log2(vocab)) + 1
                    id_steps = T.meta_var(
                        T.Cast("int32", T.ceil(T.log2(T.Cast("float32", vocab)))) + 1
                    )
                    inv_t: T.let[T.float32] = T.float32(1) / params[b, TEMPERATURE]
                    top_k: T.let[T.int32] = T.Cast("int32", params[b, TOP_K])
                    min_p: T.let[T.float32] = params[b, MIN_P]

                    # 1. the max score
                    acc_f[0] = T.float32(-3.4e38)
                    for i in T.serial(steps):
                        if i * threads + tx < vocab:
                            acc_f[0] = T.max(acc_f[0], scores[b, i * threads + tx] * inv_t)
                    red_f[tx] = acc_f[0]
                    _reduce(red_f, tx, T.max, threads, levels, gpu)
                    sf[0] = red_f[0]
                    _sync(gpu)
                    # 2. min_p keeps s >= max + log(min_p): a count of them caps the top_k
                    thr: T.let[T.float32] = T.if_then_else(
                        min_p > T.float32(0), sf[0] + T.log(min_p), T.float32(-3.4e38)
                    )
                    acc_i[0] = 0
                    for i in T.serial(steps):
                        if i * threads + tx < vocab:
                            if scores[b, i * threads + tx] * inv_t >= thr:
                                acc_i[0] = acc_i[0] + 1
                    red_i[tx] = acc_i[0]
                    _reduce(red_i, tx, _add, threads, levels, gpu)
                    si[4] = T.if_then_else(top_k > 0, T.min(top_k, red_i[0]), red_i[0])
                    _sync(gpu)
                    # 3. the k_eff-th key in rank order: the largest t with count(key >= t) >= k
                    si[0] = _INT_MIN
                    si[1] = _key(sf[0])
                    for _step in T.serial(KEY_STEPS):
                        mid: T.let[T.int32] = _mid(si[0], si[1]) + T.bitwise_and(
                            si[0] ^ si[1], 1
                        )  # ceil, so lo moves up
                        acc_i[0] = 0
                        for i in T.serial(steps):
                            if i * threads + tx < vocab:
                                if _key(scores[b, i * threads + tx] * inv_t) >= mid:
                                    acc_i[0] = acc_i[0] + 1
                        red_i[tx] = acc_i[0]
                        _reduce(red_i, tx, _add, threads, levels, gpu)
                        si[5] = red_i[0]
                        if si[0] < si[1]:
                            if si[5] >= si[4]:
                                si[0] = mid
                            else:
                                si[1] = mid - 1
                        _sync(gpu)
                    si[2] = si[0]
                    # ... and among its ties, the smallest id c with count(key == t, id <= c) >= r
                    acc_i[0] = 0
                    for i in T.serial(steps):
                        if i * threads + tx < vocab:
                            if _key(scores[b, i * threads + tx] * inv_t) > si[2]:
                                acc_i[0] = acc_i[0] + 1
                    red_i[tx] = acc_i[0]
                    _reduce(red_i, tx, _add, threads, levels, gpu)
                    rank_left: T.let[T.int32] = si[4] - red_i[0]
                    _sync(gpu)
                    si[0] = 0
                    si[1] = vocab - 1
                    for _step in T.serial(id_steps):
                        mid_id: T.let[T.int32] = _mid(si[0], si[1])
                        acc_i[0] = 0
                        for i in T.serial(steps):
                            if i * threads + tx <= mid_id:
                                if _key(scores[b, i * threads + tx] * inv_t) == si[2]:
                                    acc_i[0] = acc_i[0] + 1
                        red_i[tx] = acc_i[0]
                        _reduce(red_i, tx, _add, threads, levels, gpu)
                        si[5] = red_i[0]
                        if si[0] < si[1]:
                            if si[5] >= rank_left:
                                si[1] = mid_id
                            else:
                                si[0] = mid_id + 1
                        _sync(gpu)
                    si[3] = si[0]
                    # 4. Z2: the mass of the tokens kept so far (relative to exp(max))
                    _mass(
                        scores,
                        b,
                        tx,
                        steps,
                        inv_t,
                        sf,
                        si,
                        acc_f,
                        red_f,
                        _INT_MIN,
                        -1,
                        (threads, levels, vocab, gpu),
                    )
                    sf[1] = red_f[0]
                    _sync(gpu)
                    # 5. top_p: the smallest key t with mass(kept, key > t) < top_p * Z2 ...
                    target_p: T.let[T.float32] = params[b, TOP_P] * sf[1]
                    si[0] = si[2]
                    si[1] = _key(sf[0])
                    for _step in T.serial(KEY_STEPS):
                        mid_p: T.let[T.int32] = _mid(si[0], si[1])
                        _mass(
                            scores,
                            b,
                            tx,
                            steps,
                            inv_t,
                            sf,
                            si,
                            acc_f,
                            red_f,
                            mid_p,
                            -1,
                            (threads, levels, vocab, gpu),
                        )
                        sf[4] = red_f[0]
                        if si[0] < si[1]:
                            if sf[4] < target_p:
                                si[1] = mid_p
                            else:
                                si[0] = mid_p + 1
                        _sync(gpu)
                    top_key: T.let[T.int32] = si[0]
                    _mass(
                        scores,
                        b,
                        tx,
                        steps,
                        inv_t,
                        sf,
                        si,
                        acc_f,
                        red_f,
                        top_key,
                        -1,
                        (threads, levels, vocab, gpu),
                    )
                    sf[2] = red_f[0]
                    _sync(gpu)
                    # ... and among its ties, the largest id c with mass above + ties before c
                    # < top_p * Z2 (the tokens whose mass before them is short of top_p)
                    si[0] = 0
                    si[1] = vocab - 1
                    for _step in T.serial(id_steps):
                        mid_c: T.let[T.int32] = _mid(si[0], si[1]) + T.bitwise_and(si[0] ^ si[1], 1)
                        _mass(
                            scores,
                            b,
                            tx,
                            steps,
                            inv_t,
                            sf,
                            si,
                            acc_f,
                            red_f,
                            top_key,
                            mid_c,
                            (threads, levels, vocab, gpu),
                        )
                        sf[4] = red_f[0]
                        if si[0] < si[1]:
                            if sf[2] + sf[4] < target_p:
                                si[0] = mid_c
                            else:
                                si[1] = mid_c - 1
                        _sync(gpu)
                    if params[b, TOP_P] < T.float32(1):
                        if top_key > si[2]:
                            si[2] = top_key
                            si[3] = si[0]
                        else:
                            si[3] = T.min(si[3], si[0])
                    # 6. the draw: the first kept id whose cumulative mass exceeds u * Z3
                    _draw(
                        scores,
                        params,
                        tokens,
                        b,
                        tx,
                        inv_t,
                        sf,
                        si,
                        acc_f,
                        acc_i,
                        red_f,
                        red_i,
                        (threads, levels, vocab, gpu),
                    )

    return sample_from_scores


@T.macro(hygienic=False)
def _draw(scores, params, tokens, b, tx, inv_t, sf, si, acc_f, acc_i, red_f, red_i, sizes):
    """tokens[b] = the first kept id (_is_kept with the cut in si[2], si[3]) whose cumulative
    mass exceeds the row's uniform times the kept mass: the inverse-CDF draw. sf[0] holds the
    max score. sizes: (threads, levels, vocab, gpu)."""
    threads, levels, vocab, gpu = T.meta_var(sizes)
    steps = T.meta_var((vocab + threads - 1) // threads)
    # bisection steps over token ids [0, vocab): ceil(log2(vocab)) + 1
    id_steps = T.meta_var(T.Cast("int32", T.ceil(T.log2(T.Cast("float32", vocab)))) + 1)
    _mass(
        scores,
        b,
        tx,
        steps,
        inv_t,
        sf,
        si,
        acc_f,
        red_f,
        _INT_MIN,
        -1,
        (threads, levels, vocab, gpu),
    )
    sf[3] = params[b, UNIFORM] * red_f[0]
    _sync(gpu)
    si[0] = 0
    si[1] = vocab - 1
    for _step in T.serial(id_steps):
        mid_d: T.let[T.int32] = _mid(si[0], si[1])
        acc_f[0] = T.float32(0)
        for i in T.serial(steps):
            if i * threads + tx <= mid_d:
                _add_kept(scores, b, i * threads + tx, inv_t, sf, si, acc_f)
        red_f[tx] = acc_f[0]
        _reduce(red_f, tx, _add, threads, levels, gpu)
        sf[4] = red_f[0]
        if si[0] < si[1]:
            if sf[4] > sf[3]:
                si[1] = mid_d
            else:
                si[0] = mid_d + 1
        _sync(gpu)
    # rounding can leave the target past the last kept token: take that one
    acc_i[0] = 0
    for i in T.serial(steps):
        if i * threads + tx < vocab:
            if _is_kept(scores[b, i * threads + tx] * inv_t, i * threads + tx, si):
                acc_i[0] = T.max(acc_i[0], i * threads + tx)
    red_i[tx] = acc_i[0]
    _reduce(red_i, tx, T.max, threads, levels, gpu)
    if tx == 0:
        tokens[b] = T.min(si[0], red_i[0])


def _add(a, b):
    return a + b


def _is_kept(s, j, si):
    key = _key(s)
    return T.Or(key > si[2], T.And(key == si[2], j <= si[3]))


@T.macro(hygienic=False)
def _add_kept(scores, b, j, inv_t, sf, si, acc_f):
    if _is_kept(scores[b, j] * inv_t, j, si):
        acc_f[0] = acc_f[0] + T.exp(scores[b, j] * inv_t - sf[0])


@T.macro(hygienic=False)
def _mass(scores, b, tx, steps, inv_t, sf, si, acc_f, red_f, above, tie_before, sizes):
    """red_f[0] = the mass of the kept tokens whose key is > above (tie_before < 0), or whose
    key == above and id < tie_before (tie_before >= 0). sizes: (threads, levels, vocab, gpu)."""
    threads, levels, vocab, gpu = T.meta_var(sizes)
    acc_f[0] = T.float32(0)
    for i in T.serial(steps):
        if i * threads + tx < vocab:
            s_j: T.let[T.float32] = scores[b, i * threads + tx] * inv_t
            if _is_kept(s_j, i * threads + tx, si):
                if T.Or(
                    T.And(tie_before < 0, _key(s_j) > above),
                    T.And(
                        T.And(tie_before >= 0, _key(s_j) == above), i * threads + tx < tie_before
                    ),
                ):
                    acc_f[0] = acc_f[0] + T.exp(s_j - sf[0])
    red_f[tx] = acc_f[0]
    _reduce(red_f, tx, _add, threads, levels, gpu)


def _sample_unfiltered(threads: int, levels: int, gpu: bool):
    """Batches with no top_k, top_p or min_p (nor greedy rows): every token is kept, so of
    sample_from_scores' passes only the max and the draw remain (about 20, not about 125)."""

    @T.prim_func(s_tir=True)
    def sample_unfiltered(
        var_scores: T.handle,  # [batch, vocab] float32
        var_params: T.handle,  # [batch, PARAMS] float32
        var_tokens: T.handle,  # [batch] int32, out
    ):
        T.func_attr({"tirx.is_scheduled": True})
        batch, vocab = T.int32(), T.int32()
        scores = T.match_buffer(var_scores, (batch, vocab), "float32")
        params = T.match_buffer(var_params, (batch, PARAMS), "float32")
        tokens = T.match_buffer(var_tokens, (batch,), "int32")
        for b in _loop(batch, "blockIdx.x", gpu):
            for tx in _loop(threads, "threadIdx.x", gpu):
                with T.sblock("row"):
                    T.reads()
                    T.writes()
                    red_f = T.sblock_alloc_buffer((threads,), "float32", scope=_shared(gpu))
                    red_i = T.sblock_alloc_buffer((threads,), "int32", scope=_shared(gpu))
                    si = T.sblock_alloc_buffer((6,), "int32", scope="local")
                    sf = T.sblock_alloc_buffer((6,), "float32", scope="local")
                    acc_f = T.sblock_alloc_buffer((1,), "float32", scope="local")
                    acc_i = T.sblock_alloc_buffer((1,), "int32", scope="local")
                    inv_t: T.let[T.float32] = T.float32(1) / params[b, TEMPERATURE]
                    acc_f[0] = T.float32(-3.4e38)
                    for i in T.serial((vocab + threads - 1) // threads):
                        if i * threads + tx < vocab:
                            acc_f[0] = T.max(acc_f[0], scores[b, i * threads + tx] * inv_t)
                    red_f[tx] = acc_f[0]
                    _reduce(red_f, tx, T.max, threads, levels, gpu)
                    sf[0] = red_f[0]
                    _sync(gpu)
                    si[2] = _INT_MIN  # the cut after every token: all kept
                    si[3] = vocab - 1
                    _draw(
                        scores,
                        params,
                        tokens,
                        b,
                        tx,
                        inv_t,
                        sf,
                        si,
                        acc_f,
                        acc_i,
                        red_f,
                        red_i,
                        (threads, levels, vocab, gpu),
                    )

    return sample_unfiltered


def _argmax_scores(threads: int, levels: int, gpu: bool):
    """Greedy rows alone: the lowest id with the max score, in two passes (sample_from_scores
    takes it as top_k = 1 too, in all of its passes)."""

    @T.prim_func(s_tir=True)
    def argmax_scores(
        var_scores: T.handle,  # [batch, vocab] float32
        var_tokens: T.handle,  # [batch] int32, out
    ):
        T.func_attr({"tirx.is_scheduled": True})
        batch, vocab = T.int32(), T.int32()
        scores = T.match_buffer(var_scores, (batch, vocab), "float32")
        tokens = T.match_buffer(var_tokens, (batch,), "int32")
        for b in _loop(batch, "blockIdx.x", gpu):
            for tx in _loop(threads, "threadIdx.x", gpu):
                with T.sblock("row"):
                    T.reads()
                    T.writes()
                    red_f = T.sblock_alloc_buffer((threads,), "float32", scope=_shared(gpu))
                    red_i = T.sblock_alloc_buffer((threads,), "int32", scope=_shared(gpu))
                    acc_f = T.sblock_alloc_buffer((2,), "float32", scope="local")
                    acc_i = T.sblock_alloc_buffer((1,), "int32", scope="local")
                    steps = T.meta_var((vocab + threads - 1) // threads)
                    acc_f[0] = T.float32(-3.4e38)
                    for i in T.serial(steps):
                        if i * threads + tx < vocab:
                            acc_f[0] = T.max(acc_f[0], scores[b, i * threads + tx])
                    red_f[tx] = acc_f[0]
                    _reduce(red_f, tx, T.max, threads, levels, gpu)
                    acc_f[1] = red_f[0]
                    acc_i[0] = vocab
                    for i in T.serial(steps):
                        if i * threads + tx < vocab:
                            if scores[b, i * threads + tx] == acc_f[1]:
                                acc_i[0] = T.min(acc_i[0], i * threads + tx)
                    red_i[tx] = acc_i[0]
                    _reduce(red_i, tx, T.min, threads, levels, gpu)
                    if tx == 0:
                        tokens[b] = red_i[0]

    return argmax_scores


def _token_logprob(threads: int, levels: int, gpu: bool):
    @T.prim_func(s_tir=True)
    def token_logprob(
        var_logits: T.handle,  # [num_rows, vocab] float32
        var_rows: T.handle,  # [batch] int32
        var_tokens: T.handle,  # [batch] int32
        var_out: T.handle,  # [batch] float32, out
    ):
        T.func_attr({"tirx.is_scheduled": True})
        num_rows, vocab, batch = T.int32(), T.int32(), T.int32()
        logits = T.match_buffer(var_logits, (num_rows, vocab), "float32")
        rows = T.match_buffer(var_rows, (batch,), "int32")
        tokens = T.match_buffer(var_tokens, (batch,), "int32")
        out = T.match_buffer(var_out, (batch,), "float32")
        for b in _loop(batch, "blockIdx.x", gpu):
            for tx in _loop(threads, "threadIdx.x", gpu):
                with T.sblock("row"):
                    T.reads()
                    T.writes()
                    red_f = T.sblock_alloc_buffer((threads,), "float32", scope=_shared(gpu))
                    acc = T.sblock_alloc_buffer((2,), "float32", scope="local")
                    steps = T.meta_var((vocab + threads - 1) // threads)
                    acc[0] = T.float32(-3.4e38)
                    for i in T.serial(steps):
                        if i * threads + tx < vocab:
                            acc[0] = T.max(acc[0], logits[rows[b], i * threads + tx])
                    red_f[tx] = acc[0]
                    _reduce(red_f, tx, T.max, threads, levels, gpu)
                    acc[1] = red_f[0]
                    _sync(gpu)
                    acc[0] = T.float32(0)
                    for i in T.serial(steps):
                        if i * threads + tx < vocab:
                            acc[0] = acc[0] + T.exp(logits[rows[b], i * threads + tx] - acc[1])
                    red_f[tx] = acc[0]
                    _reduce(red_f, tx, _add, threads, levels, gpu)
                    if tx == 0:
                        out[b] = logits[rows[b], tokens[b]] - acc[1] - T.log(red_f[0])

    return token_logprob


def add_sampling_functions(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """`mod` with the kernels and the Relax functions that call them. For a CPU target
    (compile_model's sampling_kernels=True) each row is one thread: the runtime's kernel
    path then runs, and is tested, on CPU.

    The logits come as the entries return them, [a, b, vocab] (decode [batch, 1, vocab],
    prefill [1, rows, vocab]); a reshape to rows is a view, no copy."""
    gpu = target.kind.name != "llvm"
    threads = min(MAX_THREADS, thread_limits(target)[1][0]) if gpu else 1
    bb = relax.BlockBuilder(mod)
    kernels = {
        name: bb.add_func(f.with_attr("global_symbol", f"sampling_{name}"), f"sampling_{name}")
        for name, f in sampling_kernels(threads, gpu).items()
    }
    a, r, v, b, e = (tirx.Var(n, "int64") for n in ("a", "r", "vocab", "batch", "entries"))

    def tensor(name, shape, dtype):
        return relax.Var(name, relax.TensorType(shape, dtype))

    logits = tensor("logits", [a, r, v], "float32")
    rows = tensor("rows", [b], "int32")
    params = tensor("params", [b, PARAMS], "float32")
    entry_rows, entry_ids = tensor("entry_rows", [e], "int32"), tensor("entry_ids", [e], "int32")
    entry_values = tensor("entry_values", [e, ENTRY_VALUES], "float32")
    with bb.function(
        "sample_gather_scores", [logits, rows, params, entry_rows, entry_ids, entry_values]
    ):
        flat = bb.emit(relax.op.reshape(logits, [a * r, v]))
        scores = bb.emit(
            relax.call_tir(
                kernels["gather_scores"],
                [flat, rows, params, entry_rows, entry_ids, entry_values],
                relax.TensorType([b, v], "float32"),
            )
        )
        bb.emit_func_output(scores)
    scores_in = tensor("scores", [b, v], "float32")
    params2 = tensor("params", [b, PARAMS], "float32")
    with bb.function("sample_from_scores", [scores_in, params2]):
        out = bb.emit(
            relax.call_tir(
                kernels["sample_from_scores"], [scores_in, params2], relax.TensorType([b], "int32")
            )
        )
        bb.emit_func_output(out)
    scores_plain, params_plain = (
        tensor("scores", [b, v], "float32"),
        tensor("params", [b, PARAMS], "float32"),
    )
    with bb.function("sample_unfiltered", [scores_plain, params_plain]):
        out = bb.emit(
            relax.call_tir(
                kernels["sample_unfiltered"],
                [scores_plain, params_plain],
                relax.TensorType([b], "int32"),
            )
        )
        bb.emit_func_output(out)
    scores_greedy = tensor("scores", [b, v], "float32")
    with bb.function("sample_argmax", [scores_greedy]):
        out = bb.emit(
            relax.call_tir(
                kernels["argmax_scores"], [scores_greedy], relax.TensorType([b], "int32")
            )
        )
        bb.emit_func_output(out)
    logits3 = tensor("logits", [a, r, v], "float32")
    rows3, chosen = tensor("rows", [b], "int32"), tensor("tokens", [b], "int32")
    with bb.function("sample_token_logprob", [logits3, rows3, chosen]):
        flat = bb.emit(relax.op.reshape(logits3, [a * r, v]))
        out = bb.emit(
            relax.call_tir(
                kernels["token_logprob"], [flat, rows3, chosen], relax.TensorType([b], "float32")
            )
        )
        bb.emit_func_output(out)
    return bb.get()
