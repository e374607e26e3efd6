"""Sampling on the GPU: the host's half of compiler/sampling_kernels.py.

Data in, data out like sampler.py: `kernel_inputs` turns the samplers of a batch into the
kernels' plain arrays (a parameter table, the bias and penalty entries, and one uniform drawn
from each sequence's own generator, so seeded sampling stays reproducible and equal between
batch and alone); `sample_on_device` runs the artifact's functions on logits that stay on the
device and returns `Sample`s, recording each token as `sample_batch` does.

`covered` says which rows the kernels cannot take: a row with a grammar constraint (its mask is
computed on the host per step) or with top-logprobs (the kernels return the chosen token's
logprob only); such batches go to numpy (`sample_batch`) whole.
"""

from dataclasses import dataclass

import numpy as np

from relaxlm.artifacts.sampling import (
    ENTRY_VALUES,
    PARAMS,
)
from relaxlm.runtime.sampler import Logprob, Sample, Sampler


@dataclass(frozen=True)
class DeviceRow:
    """A row of logits left on the device: row `index` of a forward's [a, b, vocab] output,
    taken as [a * b, vocab]."""

    logits: object  # tvm.runtime.Tensor
    index: int

    def host(self, copies: dict[int, np.ndarray]) -> np.ndarray:
        """The row on the host; `copies` keeps one copy per forward's logits."""
        key = id(self.logits)
        if key not in copies:
            copies[key] = self.logits.numpy().reshape(-1, self.logits.shape[-1])
        return copies[key][self.index]


def covered(sampler: Sampler) -> bool:
    """Whether the kernels choose this row exactly as numpy would."""
    p = sampler.params
    return sampler.constraint is None and (p.logprobs is None or p.logprobs == 0)


def kernel_inputs(samplers: list[Sampler], vocab: int) -> dict[str, np.ndarray]:
    """The kernels' arrays for one row per sampler; draws each sampling row's uniform."""
    params = np.zeros((len(samplers), PARAMS), "float32")
    rows, ids, values = [], [], []
    for b, sampler in enumerate(samplers):
        params[b] = _row_params(sampler)
        for token, value in _entries(sampler, vocab).items():
            rows.append(b)
            ids.append(token)
            values.append(value)
    if not rows:  # the kernels take at least one entry: a no-op one
        rows, ids, values = [0], [0], [(0.0, 0.0, 0.0)]
    return {
        "params": params,
        "entry_rows": np.asarray(rows, "int32"),
        "entry_ids": np.asarray(ids, "int32"),
        "entry_values": np.asarray(values, "float32").reshape(-1, ENTRY_VALUES),
    }


def _row_params(sampler: Sampler) -> list[float]:
    p = sampler.params
    if p.temperature == 0:
        # Greedy is top_k = 1 at temperature 1; no uniform drawn, as numpy draws none.
        return [1.0, 1.0, 1.0, 0.0, 0.0, p.repetition_penalty]
    uniform = sampler.rng.random()  # the same draw numpy's _choose makes
    return [p.temperature, p.top_k, p.top_p, p.min_p, uniform, p.repetition_penalty]


def _entries(sampler: Sampler, vocab: int) -> dict[int, tuple[float, float, float]]:
    """token -> (bias, seen, subtract): sampler._adjusted's changes, one entry per token."""
    p = sampler.params
    out: dict[int, list[float]] = {}
    for token, bias in p.logit_bias.items():
        if token < vocab:
            out.setdefault(token, [0.0, 0.0, 0.0])[0] = bias
    if p.penalized:
        if p.repetition_penalty != 1:
            seen = set(sampler.prompt_ids.tolist()) | set(sampler.output_counts)
            for token in seen:
                if token < vocab:
                    out.setdefault(token, [0.0, 0.0, 0.0])[1] = 1.0
        for token, count in sampler.output_counts.items():
            if token < vocab:
                entry = out.setdefault(token, [0.0, 0.0, 0.0])
                entry[2] = p.frequency_penalty * count + p.presence_penalty
    return {token: tuple(v) for token, v in out.items()}


def _all_greedy(samplers: list[Sampler]) -> bool:
    return all(s.params.temperature == 0 for s in samplers)


def _kernel_for(samplers: list[Sampler]) -> str:
    """The cheapest kernel that serves the batch: the filters' bisections cost most passes."""
    if _all_greedy(samplers):
        return "sample_argmax"  # two passes over a row
    if all(
        s.params.temperature > 0
        and s.params.top_k == 0
        and s.params.top_p == 1
        and s.params.min_p == 0
        for s in samplers
    ):
        return "sample_unfiltered"  # the max, the mass and the draw
    return "sample_from_scores"


def sample_on_device(vm, device, logits, rows: list[int], samplers: list[Sampler]) -> list[Sample]:
    """One token for each sampler from `logits` ([num_rows, vocab] float32, on `device`): row
    rows[i] with samplers[i], every one `covered`. Records each token, as sample_batch does."""
    import tvm  # the runtime's own dependency; imported here so this module stays data-only

    vocab = int(logits.shape[-1])
    inputs = kernel_inputs(samplers, vocab)
    on = {name: tvm.runtime.tensor(a, device) for name, a in inputs.items()}
    row_ids = tvm.runtime.tensor(np.asarray(rows, "int32"), device)
    scores = vm["sample_gather_scores"](
        logits, row_ids, on["params"], on["entry_rows"], on["entry_ids"], on["entry_values"]
    )
    tokens = vm[_kernel_for(samplers)](scores, *([] if _all_greedy(samplers) else [on["params"]]))
    want_logprob = any(s.params.logprobs is not None for s in samplers)
    logprobs = vm["sample_token_logprob"](logits, row_ids, tokens).numpy() if want_logprob else None
    samples = []
    for b, (sampler, token) in enumerate(zip(samplers, tokens.numpy().tolist(), strict=True)):
        logprob = None
        if sampler.params.logprobs is not None:
            logprob = Logprob(token, float(logprobs[b]))
        sampler.record(token)
        samples.append(Sample(token, logprob))
    return samples
