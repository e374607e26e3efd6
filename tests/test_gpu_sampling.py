"""The GPU sampling kernels (compiler/sampling_kernels.py), run as WGSL on lavapipe through
wgsl_harness.py, against the numpy sampler (runtime/sampler.py) with the same seeds.

The host half (runtime/gpu_sampling.py) builds the kernels' inputs from real Samplers, drawing
each row's uniform from the sequence's own generator; numpy samples copies of the same
samplers. The tokens must be equal, row for row.
"""

import copy
from dataclasses import replace

import numpy as np
import pytest
import tvm

from relaxlm.compiler.sampling_kernels import sampling_kernels
from relaxlm.runtime import gpu_sampling
from relaxlm.runtime.sampler import Sampler, SamplingParams, sample_batch

THREADS = 64  # a vocabulary of 1000 is not a multiple of it
VOCAB = 1000

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _webgpu_kernels(threads: int):
    from wgsl_harness import NoAdapter, WebGPUFunction, webgpu_device

    try:
        device, _ = webgpu_device()
    except NoAdapter as e:
        pytest.skip(f"no WebGPU adapter: {e}")
    target = tvm.target.Target("webgpu", host="llvm")
    return {
        name: WebGPUFunction(func, target, device)
        for name, func in sampling_kernels(threads).items()
    }


@pytest.fixture(scope="module")
def kernels():
    return _webgpu_kernels(THREADS)


def test_webgpus_block_size_too():
    """256 threads, the block WebGPU artifacts build (a vocabulary of 1000 leaves the last
    pass of each row a quarter full)."""
    kernels = _webgpu_kernels(256)
    params = [SamplingParams(seed=i, **CASES["all_filters"]) for i in range(3)]
    _check(kernels, _logits(4, seed=21), [*params, SamplingParams(temperature=0)])


def _gpu_tokens(kernels, logits, rows, samplers):
    inputs = gpu_sampling.kernel_inputs(samplers, logits.shape[1])
    scores = np.zeros((len(samplers), logits.shape[1]), "float32")
    rows = np.asarray(rows, "int32")
    scores = kernels["gather_scores"](logits=logits, rows=rows, scores=scores, **inputs)["scores"]
    tokens = np.zeros(len(samplers), "int32")
    out = kernels["sample_from_scores"](scores=scores, params=inputs["params"], tokens=tokens)
    return out["tokens"], scores


def _samplers(params: list[SamplingParams], history=None):
    samplers = [Sampler(p, prompt_ids=[1, 5, 7, 900]) for p in params]
    for s in samplers:
        for token in history or ():
            s.record(token)
    return samplers


def _check(kernels, logits, params, history=None, rows=None):
    rows = list(range(len(params))) if rows is None else rows
    gpu = _samplers(params, history)
    cpu = copy.deepcopy(gpu)
    tokens, _ = _gpu_tokens(kernels, logits, rows, gpu)
    want = [s.token_id for s in sample_batch(logits[rows], cpu)]
    assert tokens.tolist() == want
    return tokens


def _logits(rows, seed=0, scale=3.0):
    return (np.random.default_rng(seed).standard_normal((rows, VOCAB)) * scale).astype("float32")


CASES = {
    "greedy": dict(temperature=0),
    "temperature": dict(temperature=0.8),
    "top_k": dict(temperature=1.0, top_k=20),
    "top_p": dict(temperature=0.9, top_p=0.7),
    "min_p": dict(temperature=1.2, min_p=0.05),
    "all_filters": dict(temperature=0.7, top_k=50, top_p=0.9, min_p=0.01),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernels_choose_numpys_token(kernels, case):
    """24 rows, each its own seed: a wrong cut or draw shows up as a different token."""
    params = [SamplingParams(seed=100 + i, **CASES[case]) for i in range(24)]
    tokens = _check(kernels, _logits(24, seed=len(case)), params)
    if case != "greedy":
        assert len(set(tokens.tolist())) > 1  # really sampling, not always the argmax


def test_unfiltered_kernel(kernels):
    """Temperature alone (no filter), the kernel that skips the cuts: numpy's tokens."""
    params = [SamplingParams(seed=40 + i, temperature=0.5 + i / 10) for i in range(12)]
    samplers = _samplers(params)
    cpu = copy.deepcopy(samplers)
    logits = _logits(12, seed=13)
    inputs = gpu_sampling.kernel_inputs(samplers, VOCAB)
    out = kernels["sample_unfiltered"](
        scores=logits, params=inputs["params"], tokens=np.zeros(12, "int32")
    )["tokens"]
    assert out.tolist() == [s.token_id for s in sample_batch(logits, cpu)]


def test_argmax_kernel(kernels):
    """Greedy batches take the two-pass argmax: the lowest id among equal maxima."""
    logits = np.random.default_rng(4).integers(0, 6, size=(12, VOCAB)).astype("float32")
    logits[3] = _logits(1, seed=5)[0]
    out = kernels["argmax_scores"](scores=logits, tokens=np.zeros(12, "int32"))["tokens"]
    assert out.tolist() == np.argmax(logits, axis=1).tolist()


def test_penalties_and_bias(kernels):
    """Bias, repetition (prompt and output), presence and frequency penalties, then sampling;
    the scores after them equal numpy's, and so do the tokens."""
    params = [
        SamplingParams(
            seed=i,
            temperature=0 if i % 3 == 0 else 0.8,
            repetition_penalty=1.3,
            presence_penalty=0.5,
            frequency_penalty=0.25,
            logit_bias={3: 5.0, 999: -2.0, 7: 1.5},
        )
        for i in range(9)
    ]
    logits = _logits(9, seed=3)
    history = [3, 3, 42, 999, 7]
    _check(kernels, logits, params, history)
    # the adjusted scores themselves, against sampler._adjusted
    from relaxlm.runtime.sampler import _adjusted

    samplers = _samplers(params, history)
    _, scores = _gpu_tokens(kernels, logits, range(9), copy.deepcopy(samplers))
    for b, sampler in enumerate(samplers):
        np.testing.assert_allclose(scores[b], _adjusted(logits[b], sampler), rtol=1e-6)


def test_ties_are_settled_by_id(kernels):
    """Integer logits: many tokens share each score, so top_k and top_p cut inside a tie and the
    kept set depends on the tie rule (lowest ids first). A kernel off by one in the tie count,
    or keeping every tied token, draws other tokens than numpy here."""
    rng = np.random.default_rng(7)
    logits = rng.integers(0, 4, size=(16, VOCAB)).astype("float32")
    params = [
        SamplingParams(seed=i, temperature=1.0, top_k=k, top_p=p)
        for i, (k, p) in enumerate(
            [(1, 1.0), (2, 1.0), (5, 1.0), (37, 1.0)] * 2 + [(0, 0.001)] * 4 + [(10, 0.5)] * 4
        )
    ]
    tokens = _check(kernels, logits, params)
    # top_k=1 at a tie of the max keeps the lowest id with the max score
    assert tokens[0] == int(np.argmax(logits[0]))
    # top_k=2 keeps the two lowest ids with the max score (there are far more than two)
    top = np.flatnonzero(logits[1] == logits[1].max())[:2]
    assert tokens[1] in top


def test_forked_rows_share_logits(kernels):
    """rows[] maps sampled rows to logits rows (n > 1 completions share their prompt's row)."""
    params = [SamplingParams(seed=s, temperature=1.0, top_p=0.95) for s in (1, 2, 3, 4)]
    _check(kernels, _logits(2, seed=9), params, rows=[0, 0, 1, 1])


def test_seeded_row_equal_alone_and_batched(kernels):
    """A seeded sequence takes the same tokens alone or among others, over several steps."""
    logits = _logits(8, seed=11)
    alone = _samplers([SamplingParams(seed=5, temperature=0.9, top_k=40)])
    batch = _samplers([SamplingParams(seed=s, temperature=0.9, top_k=40) for s in (9, 5, 2)])
    for _ in range(3):
        a, _ = _gpu_tokens(kernels, logits, [4], alone)
        b, _ = _gpu_tokens(kernels, logits, [0, 4, 7], batch)
        assert a[0] == b[1]


def test_token_logprob(kernels):
    logits = _logits(5, seed=2)
    rows = np.array([4, 0, 2], "int32")
    tokens = np.array([10, 999, 0], "int32")
    out = kernels["token_logprob"](
        logits=logits, rows=rows, tokens=tokens, out=np.zeros(3, "float32")
    )["out"]
    x = logits[rows].astype(np.float64)
    want = x[np.arange(3), tokens] - np.log(np.exp(x).sum(axis=1))
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def artifact_with_kernels(checkpoints, tmp_path_factory):
    """The tiny Llama for CPU with the kernels' CPU build in (CPU builds leave them out)."""
    from relaxlm.compiler.pipeline import compile_model

    out = tmp_path_factory.mktemp("sampling") / "llama"
    return compile_model(checkpoints("llama_gqa"), out, progress=False, sampling_kernels=True)


def test_engine_on_the_kernel_path_takes_numpys_tokens(artifact_with_kernels, monkeypatch):
    """The runtime wiring, on CPU: an engine made to sample with the artifact's kernels
    generates the same tokens as a numpy engine over the same artifact, for greedy, seeded
    sampling with every filter, penalties, bias, n=2 forks and the chosen token's logprob; a
    request with top logprobs sends its batch to numpy."""
    import relaxlm

    llm = relaxlm.LLM(str(artifact_with_kernels))
    kernel = relaxlm.LLM(str(artifact_with_kernels), sample_on_device=True)
    assert kernel.model.sample_on_device and not llm.model.sample_on_device
    vocab = llm.model.vocab_size
    rng = np.random.default_rng(0)
    prompts = [[1, *rng.integers(5, vocab, n).tolist()] for n in (4, 9, 17, 6, 12)]
    base = SamplingParams(max_tokens=10, ignore_eos=True)
    params = [
        replace(base, temperature=0, logprobs=0),
        replace(base, seed=1, temperature=0.9, top_k=20, top_p=0.9),
        replace(base, seed=2, min_p=0.02, n=2),
        replace(base, seed=3, repetition_penalty=1.3, frequency_penalty=0.4, logit_bias={7: 3.0}),
        replace(base, seed=4, presence_penalty=1.0, logprobs=0),
    ]
    rows_on_kernels = []
    run = gpu_sampling.sample_on_device

    def counted(vm, device, logits, rows, samplers):
        rows_on_kernels.append(len(rows))
        return run(vm, device, logits, rows, samplers)

    monkeypatch.setattr(gpu_sampling, "sample_on_device", counted)
    want = llm.generate(prompts, params)
    assert not rows_on_kernels
    got = kernel.generate(prompts, params)
    assert sum(rows_on_kernels) == 10 * 6  # every token of every completion
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert [c.token_ids for c in got[2].outputs] == [c.token_ids for c in want[2].outputs]
    for g, w in ((got[0], want[0]), (got[4], want[4])):
        np.testing.assert_allclose(
            [lp.logprob for lp in g.logprobs], [lp.logprob for lp in w.logprobs], atol=1e-4
        )
    # a batch all greedy takes the argmax kernel ...
    greedy = [replace(base, temperature=0)] * 3
    rows_on_kernels.clear()
    got = kernel.generate(prompts[:3], greedy)
    assert [r.token_ids for r in got] == [r.token_ids for r in llm.generate(prompts[:3], greedy)]
    assert sum(rows_on_kernels) == 10 * 3
    # and a batch with no filter the unfiltered one
    plain = [replace(base, seed=20 + i, temperature=0.7) for i in range(3)]
    got = kernel.generate(prompts[:3], plain)
    assert [r.token_ids for r in got] == [r.token_ids for r in llm.generate(prompts[:3], plain)]
    # top logprobs: numpy samples that batch, with the same tokens
    mixed = [*params[:2], replace(base, seed=9, logprobs=2)]
    rows_on_kernels.clear()
    got = kernel.generate(prompts[:3], mixed)
    assert not rows_on_kernels
    assert [r.token_ids for r in got] == [r.token_ids for r in llm.generate(prompts[:3], mixed)]


def test_cpu_builds_leave_the_kernels_out(compiled):
    """sample_on_device=True on an artifact without them: one clear error."""
    import relaxlm
    from relaxlm.errors import RelaxlmError

    llm = compiled("llama_gqa")
    with pytest.raises(RelaxlmError, match="cannot sample on the device.*recompile"):
        relaxlm.LLM(str(llm.artifact), sample_on_device=True)
