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
    llm, prompt_tokens: int = 128, decode_tokens: int = 128, repeats: int = 3
) -> BenchResult:
    """Measure an `relaxlm.LLM`."""
    from relaxlm.runtime.sampler import SamplingParams

    runs = itertools.count()

    def run(max_tokens: int) -> float:
        # A new prompt each run: the engine's prefix cache would serve a repeated one.
        ids = prompt_ids(llm.manifest.vocab_size, prompt_tokens, seed=next(runs))
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
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
