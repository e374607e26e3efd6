"""Quantized KV cache (`--kv-cache-dtype int8|fp8`, compiler/kv_quant.py).

Kernel level: the packing kernel against numpy's quantizer (exact codes and scales), and the
attention kernels reading packed pages against numpy attention over the same dequantized K/V
(tight) and over the float K/V (loose). Model level: a tiny random Llama with each cache
against the float-cache artifact; the capacity a byte budget buys; prefix reuse and chunked
prefill on a quantized cache.
"""

import math

import ml_dtypes
import numpy as np
import pytest
import tvm
from test_attention_kernels import _reference

from relaxlm.compiler import attention_kernels as ak
from relaxlm.compiler.kv_quant import KV_QUANTS, QuantLayout, numpy_quantize, pack_qkv
from relaxlm.compiler.targets import resolve_target

PAGE = ak.PAGE_SIZE
QUANTS = ["int8", "fp8"]


def _tensor(a):
    return tvm.runtime.tensor(np.ascontiguousarray(a), tvm.cpu())


def _build(kernel):
    return tvm.compile(kernel, target=resolve_target("cpu").target())


def _pack_rows(x, layout):
    """Rows x [..., d] float32 -> their packed bytes [..., d + 2] int8, and x as dequantized."""
    codes, scale = numpy_quantize(x, layout.quant)
    if layout.quant.codes == "int8":
        code_bytes = codes.astype(np.int8)
    else:
        code_bytes = codes.astype(ml_dtypes.float8_e4m3fn).view(np.int8)
    scale_bytes = scale.astype(np.float16).view(np.int8)
    return np.concatenate([code_bytes, scale_bytes], -1), codes * scale


def _pack_q(q, layout):
    """q [n, hq, d] float32 as the cache hands it to the kernels: [n, q_rows, R] int8."""
    n = q.shape[0]
    out = np.zeros((n, layout.q_rows * layout.row_bytes), np.int8)
    raw = q.reshape(n, -1).view(np.int8)
    out[:, : raw.shape[1]] = raw
    return out.reshape(n, layout.q_rows, layout.row_bytes)


def _unpack(o, layout):
    n = o.shape[0]
    values = o.reshape(n, -1)[:, : layout.num_q_heads * layout.head_dim * 4].copy()
    return values.view(np.float32).reshape(n, layout.num_q_heads, layout.head_dim)


@pytest.mark.parametrize("name", QUANTS)
def test_pack_kernel_matches_numpy_quantizer(name):
    layout = QuantLayout(KV_QUANTS[name], 4, 2, 32, "float32")
    rng = np.random.default_rng(0)
    # rows of very different sizes: the scale follows each token and head
    qkv = (rng.standard_normal((7, 8, 32)) * rng.uniform(0.01, 30, (7, 8, 1))).astype(np.float32)
    out = _tensor(np.zeros((7, layout.packed_rows, layout.row_bytes), np.int8))
    _build(pack_qkv(layout))(_tensor(qkv), out)
    got = out.numpy()
    np.testing.assert_array_equal(got[:, : layout.q_rows], _pack_q(qkv[:, :4], layout))
    want, dequantized = _pack_rows(qkv[:, 4:], layout)
    np.testing.assert_array_equal(got[:, layout.q_rows :], want)
    # the round trip's error: half a code step (int8), e4m3's 2**-4 relative (fp8)
    bound = {"int8": 0.5 / 127 * 1.01, "fp8": 2**-4 * 1.01}[name]
    amax = np.abs(qkv[:, 4:]).max(-1, keepdims=True)
    assert (np.abs(dequantized - qkv[:, 4:]) <= bound * amax).all()


def _scattered_pages(rng, seqs, hkv, d, layout):
    """Float K/V pages of sequences of `seqs` keys in shuffled page order, those pages packed,
    their dequantized values, and the cache's bookkeeping."""
    needed = [math.ceil(n / PAGE) for n in seqs]
    page_ids = rng.permutation(sum(needed) + 2).astype(np.int32)
    scales = rng.uniform(0.1, 4, (len(page_ids), 2, hkv, PAGE, 1))
    pages = (rng.standard_normal((len(page_ids), 2, hkv, PAGE, d)) * scales).astype(np.float32)
    packed, dequantized = _pack_rows(pages, layout)
    page_indptr = np.concatenate([[0], np.cumsum(needed)]).astype(np.int32)
    fills = np.array([n - (p - 1) * PAGE for n, p in zip(seqs, needed, strict=True)], np.int32)
    return pages, packed, dequantized, page_ids, page_indptr, fills


def _keys(pages, page_ids, page_indptr, i, n):
    ids = page_ids[page_indptr[i] : page_indptr[i + 1]]
    slots = np.arange(n)
    return pages[ids[slots // PAGE], 0, :, slots % PAGE], pages[ids[slots // PAGE], 1, :, slots % PAGE]


# Same keys, dequantized in numpy: only float32 summation order differs.
TIGHT = 2e-5
# Against float K/V (rows ~N(0, 1) times up to 4, so |x| up to ~14): the output moves by the
# values' quantization error and the softmax's response to the keys' (measured max over these
# cases: int8 0.085, fp8 0.38; an int8 step here is up to 0.11, e4m3's 2**-4 of |x|).
LOOSE = {"int8": 0.15, "fp8": 0.6}


@pytest.mark.parametrize("name", QUANTS)
def test_paged_decode_reads_packed_pages(name):
    hq, hkv, d = 4, 2, 64
    layout = QuantLayout(KV_QUANTS[name], hq, hkv, d, "float32")
    rng = np.random.default_rng(2)
    kernel = ak.paged_decode(hkv, hq, d, "float32", window=0, softcap=0.0, sliding_table=False, layout=layout)
    seqs = [1, 40, 77]
    pages, packed, dequantized, page_ids, page_indptr, fills = _scattered_pages(rng, seqs, hkv, d, layout)
    kbase = np.array([50 * i for i in range(len(seqs))], np.int32)
    qpos = (kbase + np.array(seqs) - 1).astype(np.int32)
    q = rng.standard_normal((len(seqs), hq, d)).astype(np.float32)
    out = _tensor(np.zeros((len(seqs), layout.q_rows, layout.row_bytes), np.int8))
    lse = _tensor(np.zeros((len(seqs), layout.q_rows), np.float32))
    inputs = (packed, page_indptr, page_ids[: page_indptr[-1]], fills, kbase, qpos)
    sm_scale = 1 / math.sqrt(d)
    _build(kernel)(_tensor(_pack_q(q, layout)), *map(_tensor, inputs), out, lse, 0, 1.0, 1e4, sm_scale)
    got = _unpack(out.numpy(), layout)
    for i, n in enumerate(seqs):
        kpos = kbase[i] + np.arange(n)
        row = slice(i, i + 1)
        exact, exact_lse = _reference(q[row], *_keys(dequantized, page_ids, page_indptr, i, n), qpos[row], kpos, sm_scale, 0, 0)
        floats, _ = _reference(q[row], *_keys(pages, page_ids, page_indptr, i, n), qpos[row], kpos, sm_scale, 0, 0)
        np.testing.assert_allclose(got[row], exact, rtol=0, atol=TIGHT)
        np.testing.assert_allclose(lse.numpy()[row, :hq], exact_lse.astype(np.float64), atol=1e-4)
        assert np.abs(got[row] - floats).max() < LOOSE[name]


@pytest.mark.parametrize("name", QUANTS)
def test_ragged_prefill_reads_packed_rows(name):
    hq, hkv, d = 4, 2, 32
    layout = QuantLayout(KV_QUANTS[name], hq, hkv, d, "float32")
    rng = np.random.default_rng(3)
    kernel = ak.ragged_prefill(hkv, hq, d, "float32", window=0, softcap=0.0, layout=layout)
    lengths = [37, 5]
    total = sum(lengths)
    q = rng.standard_normal((total, hq, d)).astype(np.float32)
    k = (rng.standard_normal((total, hkv, d)) * rng.uniform(0.1, 4, (total, hkv, 1))).astype(np.float32)
    v = rng.standard_normal((total, hkv, d)).astype(np.float32)
    k_packed, k_deq = _pack_rows(k, layout)
    v_packed, v_deq = _pack_rows(v, layout)
    indptr = np.array([0, lengths[0], total], np.int32)
    qpos = np.concatenate([np.arange(lengths[0]), 9 + np.arange(lengths[1])]).astype(np.int32)
    starts = np.array([0, 9], np.int32)
    out = _tensor(np.zeros((total, layout.q_rows, layout.row_bytes), np.int8))
    lse = _tensor(np.zeros((total, layout.q_rows), np.float32))
    sm_scale = 1 / math.sqrt(d)
    inputs = (indptr, k_packed, v_packed, indptr, qpos, starts)
    _build(kernel)(_tensor(_pack_q(q, layout)), *map(_tensor, inputs), out, lse, 1, 0, 1.0, 1e4, sm_scale)
    got = _unpack(out.numpy(), layout)
    for i in range(2):
        rows = slice(indptr[i], indptr[i + 1])
        exact, _ = _reference(q[rows], k_deq[rows], v_deq[rows], qpos[rows], qpos[rows], sm_scale, 0, 0)
        floats, _ = _reference(q[rows], k[rows], v[rows], qpos[rows], qpos[rows], sm_scale, 0, 0)
        np.testing.assert_allclose(got[rows], exact, rtol=0, atol=TIGHT)
        assert np.abs(got[rows] - floats).max() < LOOSE[name]
