"""How long a decoding stream pauses while another request's long prompt is prefilled.

One greedy stream decodes; once it has its first token, a long prompt arrives. The stream's
longest gap between two tokens (the stall), its median gap, and the long prompt's time to
first token are measured for fixed prefill budgets (`max_prefill_tokens`) and for the default
budget that follows a step-latency target (`prefill_step_target_s`, runtime/prefill_budget.py).
Each setting runs `--rounds` times, alternated; medians are printed.

    python scripts/bench_stall.py [--model default] [--quant q4-a8] [--prompt 1500] \\
        [--fixed 1024 256 64] [--targets 0.1 0.05] [--rounds 3] [--threads 2]
"""

import argparse
import statistics
import threading
import time

import numpy as np

import relaxlm
from relaxlm import SamplingParams


def one_run(llm: relaxlm.LLM, long_tokens: int, decode_tokens: int) -> tuple[float, float, float]:
    """(longest gap, median gap, long prompt's TTFT), seconds."""
    rng = np.random.default_rng(0)
    vocab = min(llm.vocab_size, llm.tokenizer.vocab_size)
    short = rng.integers(100, vocab, 8).tolist()
    long = rng.integers(100, vocab, long_tokens).tolist()
    stream = SamplingParams(max_tokens=decode_tokens, temperature=0, ignore_eos=True)
    stamps, long_start, long_first, done = [], [], [], threading.Semaphore(0)

    def on_short(output):
        if any(d.token_ids for d in output.deltas):
            stamps.append(time.perf_counter())
            if len(stamps) == 1:  # the stream decodes: the long prompt arrives
                long_start.append(time.perf_counter())
                llm.engine.submit(long, SamplingParams(max_tokens=1), on_long)
        if output.finished:
            done.release()

    def on_long(output):
        if not long_first and any(d.token_ids for d in output.deltas):
            long_first.append(time.perf_counter())
        if output.finished:
            done.release()

    llm.engine.submit(short, stream, on_short)
    done.acquire()
    done.acquire()
    gaps = np.diff(stamps)
    return float(gaps.max()), float(np.median(gaps)), long_first[0] - long_start[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="'default' or any model relaxlm.LLM takes")
    ap.add_argument("--quant", default="q4-a8")
    ap.add_argument("--prompt", type=int, default=1500, help="tokens of the long prompt")
    ap.add_argument("--decode", type=int, default=200, help="tokens the stream decodes")
    ap.add_argument("--fixed", type=int, nargs="*", default=[1024, 256, 64])
    ap.add_argument("--targets", type=float, nargs="*", default=[0.1, 0.05])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()
    model = None if args.model == "default" else args.model
    settings = [(f"fixed {n} tokens", {"max_prefill_tokens": n}) for n in args.fixed]
    settings += [(f"target {t * 1000:.0f} ms", {"prefill_step_target_s": t}) for t in args.targets]
    llms = {
        name: relaxlm.LLM(
            model,
            quant=args.quant,
            threads=args.threads,
            kv_cache_tokens=4096,
            enable_prefix_cache=False,  # every run computes its whole prompt
            **options,
        )
        for name, options in settings
    }
    for llm in llms.values():  # warm up each (first-call costs, the prefill cost measured)
        one_run(llm, min(args.prompt, 128), 8)
    results = {name: [] for name in llms}
    for _ in range(args.rounds):
        for name, llm in llms.items():
            results[name].append(one_run(llm, args.prompt, args.decode))
    print(f"{args.prompt}-token prompt arriving beside a decoding stream ({args.rounds} rounds)")
    print("| prefill budget | longest pause (ms) | median gap (ms) | long prompt TTFT (s) |")
    print("|---|---|---|---|")
    for name, runs in results.items():
        stall, gap, ttft = (statistics.median(r[i] for r in runs) for i in range(3))
        print(f"| {name} | {stall * 1000:.0f} | {gap * 1000:.1f} | {ttft:.2f} |")


if __name__ == "__main__":
    main()
