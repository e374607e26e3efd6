"""Quantized KV cache (`--kv-cache-dtype int8|fp8`, compiler/kv_quant.py).

Kernel level: the packing kernel against numpy's quantizer (exact codes and scales), and the
attention kernels reading packed pages against numpy attention over the same dequantized K/V
(tight) and over the float K/V (loose); the GPU kernels (`gpu=True`) the same way, their TIR
run on this CPU with the thread loops serial (`_threads_serial`). Model level: a tiny random
Llama with each cache against the float-cache artifact; the capacity a byte budget buys;
prefix reuse and chunked prefill on a quantized cache.
"""

import math

import ml_dtypes
import numpy as np
import pytest
import tvm
from test_attention_kernels import _reference

from relaxlm.compiler import attention_kernels as ak
from relaxlm.compiler.kv_quant import (
    KV_QUANTS,
    QuantLayout,
    merge_state,
    numpy_quantize,
    pack_qkv,
    unpack_output,
)
from relaxlm.compiler.targets import resolve_target
from relaxlm.frontends.ops import RopeSpec

PAGE = ak.PAGE_SIZE
CPU = resolve_target("cpu").target()
QUANTS = ["int8", "fp8"]


def _tensor(a):
    return tvm.runtime.tensor(np.ascontiguousarray(a), tvm.cpu())


def _build(kernel, gpu=False):
    """The kernel compiled for this CPU; `gpu`: a GPU kernel (thread-bound loops, registers),
    rewritten first by `_threads_serial`."""
    return tvm.compile(_threads_serial(kernel) if gpu else kernel, target=CPU)


def _threads_serial(func):
    """A GPU kernel's TIR with its thread-bound loops serial and its "local" (register) scratch
    global, so this CPU runs every thread in turn: the same statements, indices and arithmetic
    as on a GPU. (TVM 0.27's WebGPU codegen declares int8 buffers as WGSL `array<i8>`, a type
    WGSL does not have, and the wheel has no Vulkan or OpenCL runtime to run them another way.)
    A kernel whose threads share memory or race would be wrong here too; these do neither."""
    text, out, at = func.script(), [], 0
    key = "T.thread_binding("
    while (start := text.find(key, at)) >= 0:
        depth, end = 1, start + len(key)
        while depth:
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            end += 1
        extent = text[start + len(key) : end - 1].rsplit(", thread=", 1)[0]
        out += [text[at:start], f"T.serial({extent})"]
        at = end
    assert out, "not a GPU kernel: no thread-bound loop"
    out.append(text[at:])
    return tvm.script.from_source("".join(out).replace('scope="local"', 'scope="global"'))


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


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
@pytest.mark.parametrize("name", QUANTS)
def test_pack_kernel_matches_numpy_quantizer(name, gpu):
    layout = QuantLayout(KV_QUANTS[name], 4, 2, 32, "float32")
    rng = np.random.default_rng(0)
    # rows of very different sizes: the scale follows each token and head
    qkv = (rng.standard_normal((7, 8, 32)) * rng.uniform(0.01, 30, (7, 8, 1))).astype(np.float32)
    out = _tensor(np.zeros((7, layout.packed_rows, layout.row_bytes), np.int8))
    positions = _tensor(np.arange(7, dtype=np.int32))  # unused: no RoPE in this kernel
    _build(pack_qkv(layout, gpu=gpu), gpu)(_tensor(qkv), positions, out)
    got = out.numpy()
    np.testing.assert_array_equal(got[:, : layout.q_rows], _pack_q(qkv[:, :4], layout))
    want, dequantized = _pack_rows(qkv[:, 4:], layout)
    np.testing.assert_array_equal(got[:, layout.q_rows :], want)
    # the round trip's error: half a code step (int8), e4m3's 2**-4 relative (fp8)
    bound = {"int8": 0.5 / 127 * 1.01, "fp8": 2**-4 * 1.01}[name]
    amax = np.abs(qkv[:, 4:]).max(-1, keepdims=True)
    assert (np.abs(dequantized - qkv[:, 4:]) <= bound * amax).all()


def test_gpu_pack_rotates_as_the_cpu_kernel():
    """With RoPE (partial, float16 q/k/v): the GPU packing kernel's bytes equal the CPU one's,
    which rotates as the cache's kernel (test_rope_kernels) and quantizes as numpy (above)."""
    layout = QuantLayout(KV_QUANTS["int8"], 4, 2, 32, "float16")
    rng = np.random.default_rng(6)
    qkv = (rng.standard_normal((7, 8, 32)) * rng.uniform(0.01, 30, (7, 8, 1))).astype(np.float16)
    positions = (np.arange(7) * 13).astype(np.int32)
    got = []
    for gpu in (False, True):
        out = _tensor(np.zeros((7, layout.packed_rows, layout.row_bytes), np.int8))
        kernel = pack_qkv(layout, RopeSpec(theta=1e4, rotary_dim=16), gpu=gpu)
        _build(kernel, gpu)(_tensor(qkv), _tensor(positions), out)
        got.append(out.numpy())
    np.testing.assert_array_equal(got[1], got[0])
    assert (got[0][:, : layout.q_rows] != _pack_q(qkv[:, :4], layout)).any()  # it did rotate


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
def test_unpack_and_merge_packed_outputs(gpu):
    """The output unpacked from its bytes; two partial attentions merged as softmax weights
    (base-2 log-sum-exps) say, in place, against numpy; padding rows left alone."""
    layout = QuantLayout(KV_QUANTS["fp8"], 3, 1, 16, "float32")
    rng = np.random.default_rng(7)
    n, hq, d = 5, 3, 16
    a, b = rng.standard_normal((2, n, hq, d)).astype(np.float32)
    lse_a, lse_b = rng.uniform(-4, 4, (2, n, layout.q_rows)).astype(np.float32)
    unpacked = _tensor(np.zeros((n, hq, d), np.float32))
    _build(unpack_output(layout, gpu), gpu)(_tensor(_pack_q(a, layout)), unpacked)
    np.testing.assert_array_equal(unpacked.numpy(), a)

    out, lse = _tensor(_pack_q(a, layout)), _tensor(lse_a)
    _build(merge_state(layout, gpu), gpu)(out, lse, _tensor(_pack_q(b, layout)), _tensor(lse_b))
    top = np.maximum(lse_a, lse_b)[:, :hq, None]
    wa, wb = 2.0 ** (lse_a[:, :hq, None] - top), 2.0 ** (lse_b[:, :hq, None] - top)
    np.testing.assert_allclose(
        _unpack(out.numpy(), layout), (a * wa + b * wb) / (wa + wb), atol=1e-6
    )
    np.testing.assert_allclose(
        lse.numpy()[:, :hq], np.log2(wa + wb)[..., 0] + top[..., 0], atol=1e-5
    )
    np.testing.assert_array_equal(lse.numpy()[:, hq:], lse_a[:, hq:])


def test_the_gpu_caches_split_passes_packed_rows_through():
    """The one TVM kernel a GPU cache keeps that does arithmetic: its q/k/v split, RoPE off
    (as relaxlm's quantized caches are built), hands every byte through unchanged. (Append and
    the page copies only copy; relaxlm replaces attention and the merge.) Built for the CPU
    before GPU scheduling, which moves loops only."""
    from tvm.relax.frontend.nn.llm.position_embedding import llama_rope_with_position_map

    layout = QuantLayout(KV_QUANTS["int8"], 4, 2, 32, "float16")
    rows, r, hkv = layout.q_rows, layout.row_bytes, 2
    split = llama_rope_with_position_map(1e4, 1.0, r, rows, hkv, "int8", {}, r)
    qkv = np.random.default_rng(8).integers(-128, 128, (5, rows + 2 * hkv, r), dtype=np.int8)
    q, k, v = (_tensor(np.zeros((5, h, r), np.int8)) for h in (rows, hkv, hkv))
    _build(split)(_tensor(qkv), _tensor(np.arange(5, dtype=np.int32)), q, k, v, 0)
    np.testing.assert_array_equal(np.concatenate([q.numpy(), k.numpy(), v.numpy()], 1), qkv)


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
    return pages[ids[slots // PAGE], 0, :, slots % PAGE], pages[
        ids[slots // PAGE], 1, :, slots % PAGE
    ]


# Same keys, dequantized in numpy: only float32 summation order differs.
TIGHT = 2e-5
# Against float K/V (rows ~N(0, 1) times up to 4, so |x| up to ~14): the output moves by the
# values' quantization error and the softmax's response to the keys' (measured max over these
# cases: int8 0.085, fp8 0.38; an int8 step here is up to 0.11, e4m3's 2**-4 of |x|).
LOOSE = {"int8": 0.15, "fp8": 0.6}


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
@pytest.mark.parametrize("name", QUANTS)
def test_paged_decode_reads_packed_pages(name, gpu):
    hq, hkv, d = 4, 2, 64
    layout = QuantLayout(KV_QUANTS[name], hq, hkv, d, "float32")
    rng = np.random.default_rng(2)
    kernel = ak.paged_decode(
        hkv, hq, d, "float32", window=0, softcap=0.0, sliding_table=False, layout=layout, gpu=gpu
    )
    seqs = [1, 40, 77]
    pages, packed, dequantized, page_ids, page_indptr, fills = _scattered_pages(
        rng, seqs, hkv, d, layout
    )
    kbase = np.array([50 * i for i in range(len(seqs))], np.int32)
    qpos = (kbase + np.array(seqs) - 1).astype(np.int32)
    q = rng.standard_normal((len(seqs), hq, d)).astype(np.float32)
    out = _tensor(np.zeros((len(seqs), layout.q_rows, layout.row_bytes), np.int8))
    lse = _tensor(np.zeros((len(seqs), layout.q_rows), np.float32))
    inputs = (packed, page_indptr, page_ids[: page_indptr[-1]], fills, kbase, qpos)
    sm_scale = 1 / math.sqrt(d)
    _build(kernel, gpu)(
        _tensor(_pack_q(q, layout)), *map(_tensor, inputs), out, lse, 0, 1.0, 1e4, sm_scale
    )
    got = _unpack(out.numpy(), layout)
    for i, n in enumerate(seqs):
        kpos = kbase[i] + np.arange(n)
        row = slice(i, i + 1)
        exact, exact_lse = _reference(
            q[row],
            *_keys(dequantized, page_ids, page_indptr, i, n),
            qpos[row],
            kpos,
            sm_scale,
            0,
            0,
        )
        floats, _ = _reference(
            q[row], *_keys(pages, page_ids, page_indptr, i, n), qpos[row], kpos, sm_scale, 0, 0
        )
        np.testing.assert_allclose(got[row], exact, rtol=0, atol=TIGHT)
        np.testing.assert_allclose(lse.numpy()[row, :hq], exact_lse.astype(np.float64), atol=1e-4)
        assert np.abs(got[row] - floats).max() < LOOSE[name]


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
@pytest.mark.parametrize("name", QUANTS)
def test_paged_prefill_reads_packed_pages_in_a_window(name, gpu):
    """New rows (the last of each sequence's keys, as the cache appends them first) against
    packed pages, with a sliding window."""
    hq, hkv, d, window = 4, 2, 32, 20
    layout = QuantLayout(KV_QUANTS[name], hq, hkv, d, "float32")
    rng = np.random.default_rng(4)
    kernel = ak.paged_prefill(
        hkv,
        hq,
        d,
        "float32",
        window=window,
        softcap=0.0,
        sliding_table=False,
        layout=layout,
        gpu=gpu,
    )
    seqs, new = [45, 9], [6, 9]
    _, packed, dequantized, page_ids, page_indptr, fills = _scattered_pages(
        rng, seqs, hkv, d, layout
    )
    kbase = np.array([3, 70], np.int32)
    qpos = np.concatenate(
        [kbase[i] + n - m + np.arange(m) for i, (n, m) in enumerate(zip(seqs, new, strict=True))]
    ).astype(np.int32)
    q_indptr = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
    q = rng.standard_normal((len(qpos), hq, d)).astype(np.float32)
    out = _tensor(np.zeros((len(qpos), layout.q_rows, layout.row_bytes), np.int8))
    lse = _tensor(np.zeros((len(qpos), layout.q_rows), np.float32))
    inputs = (q_indptr, packed, page_indptr, page_ids[: page_indptr[-1]], fills, kbase, qpos)
    sm_scale = 1 / math.sqrt(d)
    _build(kernel, gpu)(
        _tensor(_pack_q(q, layout)), *map(_tensor, inputs), out, lse, 1, 0, 1.0, 1e4, sm_scale
    )
    got = _unpack(out.numpy(), layout)
    for i, n in enumerate(seqs):
        rows = slice(q_indptr[i], q_indptr[i + 1])
        keys = _keys(dequantized, page_ids, page_indptr, i, n)
        want, _ = _reference(
            q[rows], *keys, qpos[rows], kbase[i] + np.arange(n), sm_scale, window, 0
        )
        np.testing.assert_allclose(got[rows], want, rtol=0, atol=TIGHT)


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
@pytest.mark.parametrize("name", QUANTS)
def test_ragged_prefill_reads_packed_rows(name, gpu):
    hq, hkv, d = 4, 2, 32
    layout = QuantLayout(KV_QUANTS[name], hq, hkv, d, "float32")
    rng = np.random.default_rng(3)
    kernel = ak.ragged_prefill(hkv, hq, d, "float32", window=0, softcap=0.0, layout=layout, gpu=gpu)
    lengths = [37, 5]
    total = sum(lengths)
    q = rng.standard_normal((total, hq, d)).astype(np.float32)
    k = (rng.standard_normal((total, hkv, d)) * rng.uniform(0.1, 4, (total, hkv, 1))).astype(
        np.float32
    )
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
    _build(kernel, gpu)(
        _tensor(_pack_q(q, layout)), *map(_tensor, inputs), out, lse, 1, 0, 1.0, 1e4, sm_scale
    )
    got = _unpack(out.numpy(), layout)
    for i in range(2):
        rows = slice(indptr[i], indptr[i + 1])
        exact, _ = _reference(
            q[rows], k_deq[rows], v_deq[rows], qpos[rows], qpos[rows], sm_scale, 0, 0
        )
        floats, _ = _reference(q[rows], k[rows], v[rows], qpos[rows], qpos[rows], sm_scale, 0, 0)
        np.testing.assert_allclose(got[rows], exact, rtol=0, atol=TIGHT)
        assert np.abs(got[rows] - floats).max() < LOOSE[name]


# -- a tiny Llama with each cache ----------------------------------------------------------------

# head_dim 64, as SmolLM2's: a packed row is 66 bytes against float16's 128
LLAMA = {"head_dim": 64, "num_attention_heads": 2, "num_key_value_heads": 1}
IDS = [(7 * i + 3) % 400 + 10 for i in range(40)]
PREFILL = 24  # then one decode step per remaining id


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(checkpoint, {kv_cache_dtype: artifact}) for auto, float16, int8 and fp8."""
    from relaxlm.compiler.pipeline import compile_model
    from relaxlm.testing.tiny_models import make_model

    root = tmp_path_factory.mktemp("kvq")
    checkpoint = make_model(root / "llama", **LLAMA)
    artifacts = {
        kv: compile_model(checkpoint, root / kv, kv_cache_dtype=kv, progress=False)
        for kv in ("auto", "float16", *QUANTS)
    }
    return checkpoint, artifacts


def _fake_quantized_hf_logits(checkpoint, name):
    """transformers' logits with every layer's K and V (after RoPE) rounded as the cache stores
    them: per token and kv head, the float16 scale, then codes (torch, not relaxlm code)."""
    import torch
    import transformers
    from transformers.models.llama import modeling_llama

    quant = KV_QUANTS[name]

    def rounded(x):  # [b, hkv, s, d]
        amax = x.abs().amax(-1, keepdim=True)
        scale = torch.clamp(amax / quant.qmax, min=2.0**-14).half().float()
        y = torch.clamp(x / scale, -quant.qmax, quant.qmax)
        y = torch.round(y) if name == "int8" else y.to(torch.float8_e4m3fn).float()
        return y * scale

    original = modeling_llama.eager_attention_forward

    def attention(module, query, key, value, *args, **kwargs):
        return original(module, query, rounded(key), rounded(value), *args, **kwargs)

    model = transformers.AutoModelForCausalLM.from_pretrained(
        checkpoint, attn_implementation="eager"
    ).eval()
    modeling_llama.eager_attention_forward = attention
    try:
        with torch.no_grad():
            return model(torch.tensor([IDS])).logits[0].numpy()
    finally:
        modeling_llama.eager_attention_forward = original


# Logits move with K/V rounding by a lot in a random tiny model (a float16 cache alone moves
# them 0.6 % of their range): measured against the float cache, max |diff| / max |logit| is
# 0.052 (int8) and 0.22 (fp8), greedy picks agree at 100 % / 76 % (16 of 21). Against
# transformers with K/V rounded alike: 3e-6 (int8) and 9e-4 (fp8: float32 noise across an
# e4m3 rounding boundary moves a code by 2**-3 of its size, an int8 code by 1/127 of the
# row's range).
VS_FLOAT = {"int8": (0.1, 0.9), "fp8": (0.4, 0.6)}  # (max |diff| / max |logit|, greedy match)
VS_ORACLE = {"int8": 2e-4, "fp8": 3e-3}


@pytest.mark.parametrize("name", QUANTS)
def test_quantized_cache_logits(llama, name):
    """Prefill, then decode steps: within a stated bound of transformers with K/V rounded the
    same way (an independent oracle), and near the float cache's logits."""
    import relaxlm

    checkpoint, artifacts = llama
    ours = np.asarray(relaxlm.LLM(str(artifacts[name])).score(IDS, prefill=PREFILL))
    floats = np.asarray(relaxlm.LLM(str(artifacts["auto"])).score(IDS, prefill=PREFILL))
    oracle = _fake_quantized_hf_logits(checkpoint, name)[PREFILL - 1 :]
    scale = np.abs(floats).max()
    to_oracle, to_float = np.abs(ours - oracle).max() / scale, np.abs(ours - floats).max() / scale
    agree = (ours.argmax(-1) == floats.argmax(-1)).mean()
    print(f"{name}: vs oracle {to_oracle:.2e}, vs float cache {to_float:.3f}, greedy {agree:.2f}")
    assert to_oracle < VS_ORACLE[name]
    assert to_float < VS_FLOAT[name][0]
    assert agree >= VS_FLOAT[name][1]


def test_capacity_at_the_same_bytes(llama):
    """kv_cache_memory buys >= 1.9x float16's tokens (>= 3.6x float32's, the model's dtype)
    with int8 or fp8 pages, and metrics() reports the tokens and the bytes."""
    import relaxlm
    from relaxlm.runtime.model import parse_bytes

    _, artifacts = llama
    budget = "2MB"
    metrics = {
        kv: relaxlm.LLM(str(a), kv_cache_memory=budget).metrics() for kv, a in artifacts.items()
    }
    tokens = {kv: m.kv_cache_tokens for kv, m in metrics.items()}
    print("tokens in", budget, tokens)
    for m in metrics.values():
        # TVM rounds the pages up and keeps a spare: at most two pages over the budget
        page_bytes = m.kv_cache_bytes // m.kv_pages_total
        assert (
            parse_bytes(budget) - page_bytes
            < m.kv_cache_bytes
            <= parse_bytes(budget) + 2 * page_bytes
        )
    for name in QUANTS:
        assert tokens[name] >= 1.9 * tokens["float16"]
        assert tokens[name] >= 3.6 * tokens["auto"]


def test_prefix_cache_and_chunked_prefill_on_a_quantized_cache(llama):
    """Prompts computed in 16-token chunks, the second reusing the first's cached pages, give
    the greedy tokens of whole-prompt prefills without the prefix cache."""
    import relaxlm

    _, artifacts = llama
    params = relaxlm.SamplingParams(max_tokens=8, temperature=0)
    prompts = [IDS + [11, 12, 13], IDS + [21, 22]]  # 40 shared tokens: two full pages
    chunked = relaxlm.LLM(str(artifacts["int8"]), max_prefill_tokens=16, enable_prefix_cache=True)
    plain = relaxlm.LLM(str(artifacts["int8"]), enable_prefix_cache=False)
    got = [chunked.generate([p], params)[0].token_ids for p in prompts]
    want = [plain.generate([p], params)[0].token_ids for p in prompts]
    assert chunked.metrics().prefix_cache_hit_tokens >= 32
    assert got == want


# Measured on 870 tokens of the GPL (window 256, stride 128): float cache 21.806, int8 21.889
# (+0.4 %), fp8 22.463 (+3.0 %: e4m3 keeps 3 mantissa bits).
PERPLEXITY_BOUND = {"int8": 1.015, "fp8": 1.06}


@pytest.mark.slow
def test_default_model_perplexity_with_a_quantized_cache():
    """SmolLM2-135M (the default model, its float-cache compile shared with
    test_default_model.py in one session): int8 / fp8 pages within a stated ratio of the float
    cache's perplexity, and not better than it by more than noise."""
    from pathlib import Path

    import relaxlm
    from relaxlm.perplexity import perplexity

    text = Path("/usr/share/common-licenses/GPL-3").read_text()[:4000]
    base = perplexity(relaxlm.LLM(), text, window=256, stride=128).perplexity
    for name in QUANTS:
        got = perplexity(relaxlm.LLM(kv_cache_dtype=name), text, window=256, stride=128)
        print(f"perplexity float cache {base:.3f}, {name} {got.perplexity:.3f}")
        assert got.tokens > 800
        assert 0.995 < got.perplexity / base < PERPLEXITY_BOUND[name]


def test_refusals(llama, tmp_path):
    """An unknown kv_cache_dtype, a quantized cache for WebGPU (no 8-bit type in WGSL), and an
    artifact compiled with another cache each get one error naming the fix."""
    import relaxlm
    from relaxlm.compiler.pipeline import compile_model
    from relaxlm.errors import RelaxlmError

    checkpoint, artifacts = llama
    with pytest.raises(RelaxlmError, match="kv_cache_dtype='int4' is unknown; use one of"):
        compile_model(checkpoint, tmp_path / "x", kv_cache_dtype="int4", progress=False)
    with pytest.raises(RelaxlmError, match="cannot be built for WebGPU.*--kv-cache-dtype auto"):
        compile_model(
            checkpoint, tmp_path / "y", target="webgpu", kv_cache_dtype="int8", progress=False
        )
    with pytest.raises(RelaxlmError, match="kv_cache_dtype='fp8' is compiled in"):
        relaxlm.LLM(str(artifacts["int8"]), kv_cache_dtype="fp8")
    with pytest.raises(RelaxlmError, match="kv_cache_memory='lots' is not a size"):
        relaxlm.LLM(str(artifacts["int8"]), kv_cache_memory="lots")


def test_fp8_decode_matches_ml_dtypes_for_every_code():
    """The kernels' e4m3 decode (integer operations, in vectors) against ml_dtypes, all 256
    codes but the two NaNs (the quantizer saturates at 448 and never writes them)."""
    from relaxlm.tvm_api import T

    @T.prim_func(s_tir=True)
    def decode(a: T.Buffer((256,), "int8"), b: T.Buffer((256,), "float32")):
        for i in T.vectorized(256):
            b[i] = ak._decode_e4m3(a[i])

    codes = np.arange(256, dtype=np.uint8).view(np.int8)
    got = _tensor(np.zeros(256, np.float32))
    _build(decode)(_tensor(codes), got)
    want = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    finite = ~np.isnan(want)
    assert finite.sum() == 254
    np.testing.assert_array_equal(got.numpy()[finite], want[finite])


def test_fp8_encode_matches_ml_dtypes_across_magnitudes():
    """Rows whose scale is 1 (each holds 448): values from 2**-12 to 448, subnormals and
    exact ties between codes included, round as ml_dtypes rounds them."""
    layout = QuantLayout(KV_QUANTS["fp8"], 1, 1, 64, "float32")
    rng = np.random.default_rng(5)
    grid = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    grid = np.sort(grid[np.isfinite(grid) & (grid >= 0)])
    ties = (grid[:-1] + grid[1:]) / 2  # halfway between neighbouring codes
    values = np.concatenate([2.0 ** rng.uniform(-12, np.log2(448), 800), ties])
    values = values * rng.choice([-1, 1], values.size)
    rows = np.resize(values, (values.size // 63 + 1) * 63).reshape(-1, 63).astype(np.float32)
    rows = np.concatenate([np.full((len(rows), 1), 448, np.float32), rows], 1)
    qkv = np.zeros((len(rows), 3, 64), np.float32)
    qkv[:, 1] = rows
    out = _tensor(np.zeros((len(rows), layout.packed_rows, layout.row_bytes), np.int8))
    _build(pack_qkv(layout))(_tensor(qkv), _tensor(np.zeros(len(rows), np.int32)), out)
    got = out.numpy()[:, layout.q_rows, :64].view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    want = rows.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    np.testing.assert_array_equal(got, want)
