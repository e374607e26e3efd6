"""Logit agreement with llama.cpp on one GGUF file: relaxlm's paths (the file's blocks, or
converted to a scheme) against llama-cpp-python on the same file.

Per prompt, llama.cpp decodes `tokens` greedy tokens; both engines then score that same
sequence (relaxlm: prefill of the prompt, then one decode step per token), so every position
compares the two engines' next-token logits on identical inputs.

    python scripts/agreement.py [--model M.gguf] [--quant none q4-a8] [--tokens 32]
                                [--llama-cpp-variants]
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


# llama.cpp settings that change its arithmetic, not its model: how far they move llama.cpp from
# its own defaults is the yardstick for how close another engine can be. (Measured on the default
# model: with flash attention, llama.cpp's 32 greedy tokens equal its defaults' on 1 of the 6
# prompts, with an f32 KV cache on 3, top-1 96.0 % and 97.5 %.)
LLAMA_CPP_VARIANTS = {
    "llama.cpp flash attention": {"flash_attn": True},
    "llama.cpp f32 KV cache": {"type_k": 0, "type_v": 0},  # GGML_TYPE_F32
    "llama.cpp prompt token by token": {"n_batch": 1},
}


def llama_cpp_oracle(model: str | Path, n_ctx: int = 512, **settings):
    import llama_cpp

    settings = {"n_batch": n_ctx, **settings}
    return llama_cpp.Llama(
        model_path=str(model), logits_all=True, n_ctx=n_ctx, verbose=False, **settings
    )


class LlamaCppEngine:
    """llama.cpp (other `settings`) with the part of relaxlm.LLM's interface `agreement` uses,
    so llama.cpp is scored against itself exactly as relaxlm is scored against it."""

    def __init__(self, model: str | Path, **settings):
        self.llama = llama_cpp_oracle(model, **settings)
        self.tokenizer = self

    def encode(self, text: str) -> list[int]:
        return self.llama.tokenize(text.encode(), add_bos=True, special=True)

    def score(self, ids: list[int], prefill: int) -> np.ndarray:
        """Next-token logits after ids[:prefill], then after each following token."""
        self.llama.reset()
        self.llama.eval(ids[:prefill])
        for token in ids[prefill:]:
            self.llama.eval([token])
        return np.array(self.llama.scores[prefill - 1 : len(ids)])

    def generate(self, ids: list[int], params: relaxlm.SamplingParams) -> list:
        self.llama.reset()
        self.llama.eval(ids)
        out = []
        for _ in range(params.max_tokens):
            out.append(int(np.argmax(self.llama.scores[self.llama.n_tokens - 1])))
            self.llama.eval([out[-1]])
        return [_Greedy(out)]


@dataclass
class _Greedy:
    token_ids: list[int]


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
    ap.add_argument(
        "--llama-cpp-variants",
        action="store_true",
        help="also llama.cpp against itself with other settings (flash attention, ...)",
    )
    args = ap.parse_args()
    model = args.model or default_model()
    oracle = llama_cpp_oracle(model)
    model = Path(model)
    print(f"{model.name}: {len(PROMPTS)} prompts, {args.tokens} llama.cpp greedy tokens each")
    print(
        f"{'--quant or engine':<32} {'rows':>5} {'top-1':>7} {'max |diff|':>11} "
        f"{'/ max|logit|':>13} greedy"
    )
    engines = {quant: lambda q=quant: relaxlm.LLM(str(model), quant=q) for quant in args.quant}
    if args.llama_cpp_variants:
        for name, settings in LLAMA_CPP_VARIANTS.items():
            engines[name] = lambda s=settings: LlamaCppEngine(model, **s)
    for name, engine in engines.items():
        a = agreement(engine(), oracle, tokens=args.tokens)
        print(
            f"{name:<32} {a.positions:>5} {a.top1:>7.1%} {a.max_abs:>11.3f} {a.max_rel:>13.4f} "
            f"{a.greedy_equal}/{len(PROMPTS)}"
        )


if __name__ == "__main__":
    main()
