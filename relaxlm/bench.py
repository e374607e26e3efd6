"""`relaxlm bench`: prefill and decode speed of one model, measured the way peers are.

Prefill: time to first token for a prompt of random ids (one forward of the prompt plus
sampling one token). Decode: the rest of a greedy generation with EOS ignored, per token.
Best of `repeats` runs, since the host is shared.
"""

import itertools
import time
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class BenchResult:
    prompt_tokens: int
    decode_tokens: int
    ttft_s: float
    prefill_tok_s: float
    decode_tok_s: float
    peak_rss_mib: float

    def as_dict(self) -> dict:
        return asdict(self)


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM; unlike ru_maxrss, not inherited via exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def prompt_ids(vocab_size: int, n: int, seed: int = 0) -> list[int]:
    """A reproducible prompt of ordinary token ids (above the usual special ids)."""
    return np.random.default_rng(seed).integers(3, vocab_size, n).tolist()


def bench_llm(
    llm,
    prompt_tokens: int = 128,
    decode_tokens: int = 128,
    repeats: int = 3,
    lora: str | None = None,
) -> BenchResult:
    """Measure an `relaxlm.LLM` (generating with its LoRA adapter `lora`, if named)."""
    from relaxlm.runtime.sampler import SamplingParams

    runs = itertools.count()

    def run(max_tokens: int) -> float:
        # A new prompt each run: the engine's prefix cache would serve a repeated one.
        ids = prompt_ids(llm.manifest.vocab_size, prompt_tokens, seed=next(runs))
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, lora=lora)
        start = time.perf_counter()
        llm.generate([ids], params)
        return time.perf_counter() - start

    run(2)  # warm-up: first calls allocate
    ttft = min(run(1) for _ in range(repeats))
    total = min(run(decode_tokens + 1) for _ in range(repeats))
    decode = max(total - ttft, 1e-9)
    return BenchResult(
        prompt_tokens=prompt_tokens,
        decode_tokens=decode_tokens,
        ttft_s=ttft,
        prefill_tok_s=prompt_tokens / ttft,
        decode_tok_s=decode_tokens / decode,
        peak_rss_mib=peak_rss_mib(),
    )


# Text that repeats itself, so its continuation copies earlier tokens: the case prompt lookup
# (n-gram drafting) is for, as in editing code or quoting a document.
REPETITIVE_TEXT = (
    "def area(width, height):\n    return width * height\n\n"
    "def perimeter(width, height):\n    return 2 * (width + height)\n\n"
) * 4 + "def area(width, height):\n"


@dataclass
class SpeculativeBenchResult:
    draft_model: str
    num_draft_tokens: int
    prompt_tokens: int
    decode_tokens: int
    plain_decode_tok_s: float
    speculative_decode_tok_s: float
    speedup: float
    draft_tokens: int  # drafted in the timed speculative runs
    accepted_draft_tokens: int
    acceptance_rate: float | None
    same_tokens: bool  # greedy output with and without speculation

    def as_dict(self) -> dict:
        return asdict(self)


def bench_speculative(
    llm, draft_model: str, prompt: list[int], decode_tokens: int = 128, repeats: int = 3
) -> SpeculativeBenchResult:
    """Greedy decode speed of one `relaxlm.LLM` built with a draft model, with speculation off
    (SamplingParams.speculative=False) and on, best of `repeats` each, and the acceptance rate.

    The same prompt every run: the prefix cache serves it alike in both modes, so the time of
    (decode_tokens + 1) tokens less that of 1 token is the decode time.
    """
    from relaxlm.runtime.sampler import SamplingParams

    def run(speculative: bool, max_tokens: int) -> tuple[float, list[int]]:
        params = SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True, speculative=speculative
        )
        start = time.perf_counter()
        (result,) = llm.generate([prompt], params)
        return time.perf_counter() - start, result.token_ids

    def decode_s(speculative: bool) -> tuple[float, list[int]]:
        run(speculative, 2)  # warm-up
        first = min(run(speculative, 1)[0] for _ in range(repeats))
        timed = [run(speculative, decode_tokens + 1) for _ in range(repeats)]
        return max(min(t for t, _ in timed) - first, 1e-9), timed[0][1]

    plain_s, plain_ids = decode_s(False)
    before = llm.metrics()
    spec_s, spec_ids = decode_s(True)
    after = llm.metrics()
    drafted = after.draft_tokens - before.draft_tokens
    accepted = after.accepted_draft_tokens - before.accepted_draft_tokens
    return SpeculativeBenchResult(
        draft_model=str(draft_model),
        num_draft_tokens=llm.engine.num_draft_tokens,
        prompt_tokens=len(prompt),
        decode_tokens=decode_tokens,
        plain_decode_tok_s=decode_tokens / plain_s,
        speculative_decode_tok_s=decode_tokens / spec_s,
        speedup=plain_s / spec_s,
        draft_tokens=drafted,
        accepted_draft_tokens=accepted,
        acceptance_rate=accepted / drafted if drafted else None,
        same_tokens=plain_ids == spec_ids,
    )
