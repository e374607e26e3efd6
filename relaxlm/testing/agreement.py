"""Logit agreement with llama.cpp on one GGUF file: relaxlm's paths (the file's blocks, or
converted to a scheme) against llama-cpp-python on the same file.

Per prompt, llama.cpp decodes `tokens` greedy tokens; both engines then score that same
sequence (relaxlm: prefill of the prompt, then one decode step per token), so every position
compares the two engines' next-token logits on identical inputs.

    python scripts/agreement.py [--model M.gguf] [--quant none q4-a8] [--tokens 32]
"""

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import relaxlm

PROMPTS = [
    "Once upon a time",
    "Water boils at",
    "The largest planet in our solar system is",
    "Which planet is known as the Red Planet?",
    "def fibonacci(n):",
    "The capital of France is",
]


@dataclass
class Agreement:
    positions: int  # next-token logit rows compared
    top1: float  # fraction of rows whose argmax is the same
    max_abs: float  # max |logit difference| over all rows and tokens
    max_rel: float  # max_abs / max |llama.cpp logit|
    greedy_equal: int  # prompts whose greedy tokens equal llama.cpp's, all of them


def llama_cpp_oracle(model: str | Path, n_ctx: int = 512):
    import llama_cpp

    return llama_cpp.Llama(
        model_path=str(model), logits_all=True, n_ctx=n_ctx, n_batch=n_ctx, verbose=False
    )


def agreement(llm: relaxlm.LLM, oracle, prompts=PROMPTS, tokens: int = 32) -> Agreement:
    """relaxlm's logits against llama.cpp's along llama.cpp's greedy continuations."""
    same = rows = greedy = 0
    max_abs = max_rel = 0.0
    for prompt in prompts:
        ids = llm.tokenizer.encode(prompt)
        oracle.reset()
        oracle.eval(ids)
        theirs = []
        for _ in range(tokens):
            theirs.append(int(np.argmax(oracle.scores[oracle.n_tokens - 1])))
            oracle.eval([theirs[-1]])
        ref = np.array(oracle.scores[len(ids) - 1 : len(ids) + tokens])
        ours = llm.score(ids + theirs, prefill=len(ids))
        same += int((ours.argmax(-1) == ref.argmax(-1)).sum())
        rows += len(ref)
        diff = float(np.abs(ours - ref).max())
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / float(np.abs(ref).max()))
        params = relaxlm.SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
        greedy += llm.generate(ids, params)[0].token_ids == theirs
    return Agreement(rows, same / rows, max_abs, max_rel, greedy)


def main() -> None:
    from relaxlm.default_model import default_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="GGUF file (default: the default model)")
    ap.add_argument("--quant", nargs="+", default=["none", "q4-a8"], help="relaxlm --quant values")
    ap.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt")
    args = ap.parse_args()
    model = args.model or default_model()
    oracle = llama_cpp_oracle(model)
    model = Path(model)
    print(f"{model.name}: {len(PROMPTS)} prompts, {args.tokens} llama.cpp greedy tokens each")
    print(f"{'--quant':<8} {'rows':>5} {'top-1':>7} {'max |diff|':>11} {'/ max|logit|':>13} greedy")
    for quant in args.quant:
        a = agreement(relaxlm.LLM(str(model), quant=quant), oracle, tokens=args.tokens)
        print(
            f"{quant:<8} {a.positions:>5} {a.top1:>7.1%} {a.max_abs:>11.3f} {a.max_rel:>13.4f} "
            f"{a.greedy_equal}/{len(PROMPTS)}"
        )


if __name__ == "__main__":
    main()
