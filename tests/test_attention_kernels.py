"""relaxlm's attention kernels called directly, against numpy, at sizes the model tests miss.

The paged-KV model tests (test_lower_attention_pass.py) add at most 4 tokens per step; here
prompts span several row tiles and key blocks (`ROW_TILE`, `KEY_BLOCK`), batches mix lengths,
and the paged kernel reads a prefix from scattered pages, through a sliding-window table too.

Each test runs the CPU kernels, and the GPU kernels (`gpu=True`: a thread per query row and
head) built for WebGPU and run on Mesa's lavapipe through `wgsl_harness` — the same TIR that
CUDA builds for Gemma 2/3, run on a real GPU API without a GPU.
"""

import math

import numpy as np
import pytest
import tvm

from relaxlm.compiler import attention_kernels as ak
from relaxlm.compiler.targets import resolve_target

PAGE = ak.PAGE_SIZE


def _reference(q, k, v, qpos, kpos, sm_scale, window, softcap, bidirectional=False):
    """Output [n, hq, d] and base-2 log-sum-exp [n, hq] of one sequence, in float64.
    bidirectional: no causal mask (keys after a query are seen too)."""
    hq, hkv = q.shape[1], k.shape[1]
    k, v = np.repeat(k, hq // hkv, axis=1), np.repeat(v, hq // hkv, axis=1)
    scores = np.einsum("qhd,khd->hqk", q.astype(np.float64), k) * sm_scale
    if softcap:
        scores = softcap * np.tanh(scores / softcap)
    visible = kpos[None, :] <= qpos[:, None]
    if bidirectional:
        visible = np.ones_like(visible)
    if window:
        visible &= kpos[None, :] > qpos[:, None] - window
    scores = np.where(visible[None], scores, -np.inf)
    top = np.where(visible.any(-1)[None], scores.max(-1), 0.0)
    weights = np.exp(scores - top[..., None])
    total = weights.sum(-1)
    out = np.einsum("hqk,khd->qhd", weights / np.where(total > 0, total, 1)[..., None], v)
    lse = np.where(total > 0, (top + np.log(np.where(total > 0, total, 1))) / math.log(2), None)
    return out, lse.T


class _Cpu:
    gpu = False

    def run(self, kernel, q, inputs, prefill: bool, sm_scale: float):
        """The kernel's output and log-sum-exp for queries q [rows, hq, d] and its other inputs
        (arrays), then flags: causal (prefill only) and rotary_mode 0, RoPE scale and theta."""
        built = tvm.compile(kernel, target=resolve_target("cpu").target())
        out = _tensor(np.zeros_like(q))
        lse = _tensor(np.zeros(q.shape[:2], np.float32))
        flags = (1, 0) if prefill else (0,)
        built(_tensor(q), *map(_tensor, inputs), out, lse, *flags, 1.0, 10000.0, sm_scale)
        return out.numpy(), lse.numpy()


class _WebGPU:
    gpu = True

    def __init__(self, device):
        self.device = device

    def run(self, kernel, q, inputs, prefill: bool, sm_scale: float):
        from wgsl_harness import WebGPUFunction

        out = np.zeros_like(q)
        lse = np.zeros(q.shape[:2], np.float32)
        flags = (1, 0) if prefill else (0,)
        args = (q, *inputs, out, lse, *flags, 1.0, 10000.0, sm_scale)
        names = [p.name for p in kernel.params]
        func = WebGPUFunction(kernel, resolve_target("webgpu").target(), self.device)
        got = func(**dict(zip(names, args, strict=True)))
        return got[names[len(inputs) + 1]], got[names[len(inputs) + 2]]


@pytest.fixture(scope="module", params=["cpu", "webgpu"])
def device(request):
    """Where the kernels run: the CPU, or the GPU kernels on a WebGPU adapter."""
    if request.param == "cpu":
        return _Cpu()
    from wgsl_harness import NoAdapter, webgpu_device

    try:
        return _WebGPU(webgpu_device()[0])
    except NoAdapter as e:
        pytest.skip(f"no WebGPU adapter: {e}")


def _tensor(a, dtype=None):
    return tvm.runtime.tensor(np.ascontiguousarray(a, dtype=dtype or a.dtype), tvm.cpu())


def _check(out, lse, expected, atol):
    for i, (want_out, want_lse) in enumerate(expected):
        np.testing.assert_allclose(out[i], want_out, rtol=0, atol=atol, err_msg=f"sequence {i}")
        seen = np.array([x is not None for x in want_lse.ravel()]).reshape(want_lse.shape)
        np.testing.assert_allclose(
            lse[i][seen], want_lse[seen].astype(np.float64), rtol=0, atol=1e-4
        )
        assert (lse[i][~seen] < -1e4).all(), "a row that sees no key must merge with weight 0"


# max |error| allowed in outputs: float16 outputs are rounded to 2**-11 of their size
ATOL = {"float32": 2e-6, "float16": 2e-3}


@pytest.mark.parametrize(
    "hq, hkv, d, lengths, window, softcap, dtype",
    [
        (4, 2, 64, [1, 37, 50], 0, 0.0, "float32"),
        (2, 2, 16, [40], 0, 0.0, "float32"),
        (4, 1, 32, [33, 17], 12, 0.0, "float32"),
        (2, 1, 16, [35], 0, 3.0, "float32"),
        (4, 2, 24, [30, 9], 12, 3.0, "float16"),
    ],
    ids=["gqa-d64", "mha-d16", "window", "softcap", "float16-d24-window-softcap"],
)
def test_ragged_prefill_matches_numpy(device, hq, hkv, d, lengths, window, softcap, dtype):
    rng = np.random.default_rng(0)
    kernel = ak.ragged_prefill(hkv, hq, d, dtype, window=window, softcap=softcap, gpu=device.gpu)
    total = sum(lengths)
    q = rng.standard_normal((total, hq, d)).astype(dtype)
    k = rng.standard_normal((total, hkv, d)).astype(dtype)
    v = rng.standard_normal((total, hkv, d)).astype(dtype)
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    # Sequence i starts at position 5 * i: positions are absolute, not row numbers.
    starts = [5 * i for i in range(len(lengths))]
    qpos = np.concatenate([s + np.arange(n) for s, n in zip(starts, lengths, strict=True)]).astype(
        np.int32
    )
    sm_scale = 1 / math.sqrt(d)
    inputs = (indptr, k, v, indptr, qpos, np.array(starts, np.int32))
    got_out, got_lse = device.run(kernel, q, inputs, True, sm_scale)
    expected, split = [], []
    for i in range(len(lengths)):
        rows = slice(indptr[i], indptr[i + 1])
        expected.append(
            _reference(q[rows], k[rows], v[rows], qpos[rows], qpos[rows], sm_scale, window, softcap)
        )
        split.append((got_out[rows], got_lse[rows]))
    _check([o for o, _ in split], [s for _, s in split], expected, atol=ATOL[dtype])


def test_ragged_prefill_with_a_negative_scale_is_bidirectional(device):
    """A negated softmax scale (Gemma 3's image block, lower_attention_to_paged_kv.py) lifts
    the causal mask among the forward's tokens: every query sees every key of its sequence."""
    rng = np.random.default_rng(1)
    hq, hkv, d, lengths = 4, 2, 16, [20, 7]
    kernel = ak.ragged_prefill(hkv, hq, d, "float32", window=0, softcap=0.0, gpu=device.gpu)
    total = sum(lengths)
    q, k, v = (rng.standard_normal((total, h, d)).astype("float32") for h in (hq, hkv, hkv))
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    qpos = np.concatenate([3 + np.arange(n) for n in lengths]).astype(np.int32)
    sm_scale = 1 / math.sqrt(d)
    inputs = (indptr, k, v, indptr, qpos, np.array([3, 3], np.int32))
    got_out, got_lse = device.run(kernel, q, inputs, True, -sm_scale)
    expected, split = [], []
    for i in range(len(lengths)):
        rows = slice(indptr[i], indptr[i + 1])
        expected.append(
            _reference(q[rows], k[rows], v[rows], qpos[rows], qpos[rows], sm_scale, 0, 0.0, True)
        )
        split.append((got_out[rows], got_lse[rows]))
    _check([o for o, _ in split], [s for _, s in split], expected, atol=ATOL["float32"])


def _scattered_cache(rng, seqs, hkv, d, offset, sliding_table):
    """Pages holding sequences of `seqs` keys each (from slot `offset` of the first page) in
    shuffled page order, and the cache's bookkeeping for them."""
    pages_needed = [math.ceil((offset + n) / PAGE) for n in seqs]
    page_ids = rng.permutation(sum(pages_needed) + 3).astype(np.int32)
    pages = rng.standard_normal((len(page_ids), 2, hkv, PAGE, d)).astype(np.float32)
    page_indptr = np.concatenate([[0], np.cumsum(pages_needed)]).astype(np.int32)
    fills = [offset + n - (p - 1) * PAGE for n, p in zip(seqs, pages_needed, strict=True)]
    if sliding_table:
        length_info = np.array([fills, [offset] * len(seqs), [0] * len(seqs)], np.int32)
    else:
        length_info = np.array(fills, np.int32)
    return pages, page_ids, page_indptr, length_info


def _cached(pages, page_ids, page_indptr, i, offset, n):
    """Keys and values [n, hkv, d] of sequence i."""
    ids = page_ids[page_indptr[i] : page_indptr[i + 1]]
    slots = offset + np.arange(n)
    return pages[ids[slots // PAGE], 0, :, slots % PAGE], pages[
        ids[slots // PAGE], 1, :, slots % PAGE
    ]


@pytest.mark.parametrize(
    "hq, hkv, d, window, softcap, sliding_table, dtype",
    [
        (4, 2, 64, 0, 0.0, False, "float32"),
        (4, 1, 32, 20, 0.0, True, "float32"),
        (2, 2, 16, 0, 2.0, False, "float32"),
        # Gemma 2's kind of layer in float16, at Phi-3's head_dim 24
        (4, 2, 24, 20, 3.0, True, "float16"),
    ],
    ids=["gqa-d64", "window-table", "softcap", "float16-d24-window-softcap"],
)
def test_paged_decode_matches_numpy(device, hq, hkv, d, window, softcap, sliding_table, dtype):
    rng = np.random.default_rng(2)
    kernel = ak.paged_decode(
        hkv,
        hq,
        d,
        dtype,
        window=window,
        softcap=softcap,
        sliding_table=sliding_table,
        gpu=device.gpu,
    )
    seqs = [1, 40, 77, 8]  # keys cached per sequence, the new token's among them
    offset = 3 if sliding_table else 0
    pages, page_ids, page_indptr, length_info = _scattered_cache(
        rng, seqs, hkv, d, offset, sliding_table
    )
    pages = pages.astype(dtype)
    kbase = np.array([50 * i for i in range(len(seqs))], np.int32)
    qpos = (kbase + np.array(seqs) - 1).astype(np.int32)
    q = rng.standard_normal((len(seqs), hq, d)).astype(dtype)
    sm_scale = 1 / math.sqrt(d)
    inputs = (pages, page_indptr, page_ids[: page_indptr[-1]], length_info, kbase, qpos)
    got_out, got_lse = device.run(kernel, q, inputs, False, sm_scale)
    expected = []
    for i, n in enumerate(seqs):
        keys, values = _cached(pages, page_ids, page_indptr, i, offset, n)
        kpos = kbase[i] + np.arange(n)
        expected.append(
            _reference(q[i : i + 1], keys, values, qpos[i : i + 1], kpos, sm_scale, window, softcap)
        )
    _check(
        [got_out[i : i + 1] for i in range(len(seqs))],
        [got_lse[i : i + 1] for i in range(len(seqs))],
        expected,
        atol=ATOL[dtype],
    )


@pytest.mark.parametrize(
    "sliding_table, dtype", [(False, "float32"), (True, "float32"), (True, "float16")]
)
def test_paged_prefill_reads_a_prefix_from_scattered_pages(device, sliding_table, dtype):
    hq, hkv, d = 4, 2, 32
    rng = np.random.default_rng(1)
    window = 24 if sliding_table else 0
    kernel = ak.paged_prefill(
        hkv,
        hq,
        d,
        dtype,
        window=window,
        softcap=0.0,
        sliding_table=sliding_table,
        gpu=device.gpu,
    )
    # (keys already cached, new tokens); the new tokens are in the pages too, as the cache does.
    seqs = [(40, 20), (3, 1), (70, 35)]
    offset = 5 if sliding_table else 0  # a sliding table starts a few slots into its first page
    pages, page_ids, page_indptr, length_info = _scattered_cache(
        rng, [c + n for c, n in seqs], hkv, d, offset, sliding_table
    )
    pages = pages.astype(dtype)
    kbase = np.array([100 * i for i in range(len(seqs))], np.int32)
    q_indptr = np.concatenate([[0], np.cumsum([n for _, n in seqs])]).astype(np.int32)
    qpos = np.concatenate([kbase[i] + c + np.arange(n) for i, (c, n) in enumerate(seqs)]).astype(
        np.int32
    )
    q = rng.standard_normal((q_indptr[-1], hq, d)).astype(dtype)
    sm_scale = 1 / math.sqrt(d)
    inputs = (q_indptr, pages, page_indptr, page_ids[: page_indptr[-1]], length_info, kbase, qpos)
    got_out, got_lse = device.run(kernel, q, inputs, True, sm_scale)
    expected, split = [], []
    for i, (cached, new) in enumerate(seqs):
        keys, values = _cached(pages, page_ids, page_indptr, i, offset, cached + new)
        rows = slice(q_indptr[i], q_indptr[i + 1])
        kpos = kbase[i] + np.arange(cached + new)
        expected.append(_reference(q[rows], keys, values, qpos[rows], kpos, sm_scale, window, 0.0))
        split.append((got_out[rows], got_lse[rows]))
    _check([o for o, _ in split], [s for _, s in split], expected, atol=ATOL[dtype])
