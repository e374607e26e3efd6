"""Decode throughput of the engine at several batch sizes, on a ~100M-parameter Llama.

Builds a random-weight Llama with transformers (hidden 768, 12 layers, 12 heads, ffn 2048,
vocab 32000; the tiny trained tokenizer of relaxlm.testing.tiny_models, since only ids matter here),
compiles it once, then for each batch size B generates B different prompts together, greedy
with EOS ignored. Decode time is the time of a run of 1 + N tokens minus that of a 1-token run
(prompt prefill and the first token), best of `--repeats`; throughput counts all B sequences.

    python scripts/bench_batch.py [--work DIR] [--batches 1 4 16] [--prompt 32] [--decode 64]
                                  [--gemm library]
"""

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from relaxlm.testing.tiny_models import make_tokenizer

CONFIG = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 12,
    "intermediate_size": 2048,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
}


def build_checkpoint(folder: Path) -> Path:
    if (folder / "config.json").is_file():
        return folder
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**CONFIG, bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(folder, safe_serialization=True)
    make_tokenizer(folder, kind="spm")
    return folder


def build_artifact(checkpoint: Path, folder: Path, gemm: str = "tir") -> Path:
    import relaxlm
    from relaxlm.artifacts import is_artifact

    if is_artifact(folder):
        return folder
    start = time.perf_counter()
    relaxlm.compile(checkpoint, output=folder, target="cpu", gemm=gemm)
    print(f"compiled in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return folder


def timed_generate(llm, prompts, max_tokens: int) -> float:
    from relaxlm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    results = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    assert all(len(r.token_ids) == max_tokens for r in results)
    return elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/relaxlm-bench-batch"))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens per sequence")
    parser.add_argument("--decode", type=int, default=64, help="decode tokens per sequence")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gemm", default="tir", choices=("tir", "library"), help="as compile's")
    args = parser.parse_args(argv)

    import relaxlm

    checkpoint = build_checkpoint(args.work / "checkpoint")
    suffix = "" if args.gemm == "tir" else f"-gemm_{args.gemm}"
    artifact = build_artifact(checkpoint, args.work / f"artifact{suffix}", args.gemm)
    max_batch = max(args.batches)
    # No prefix cache: every run must prefill its prompts, as the subtraction assumes.
    llm = relaxlm.LLM(
        str(artifact),
        max_batch_size=max_batch,
        kv_cache_tokens=max_batch * (args.prompt + args.decode + 16),
        enable_prefix_cache=False,
    )
    n_params = sum(int(np.prod(p["shape"])) for p in llm.manifest.params)
    threads = os.environ.get("TVM_NUM_THREADS", str(os.cpu_count()))
    print(
        f"model: {n_params / 1e6:.1f} M parameters, float32, {threads} threads, --gemm {args.gemm}"
    )
    rng = np.random.default_rng(0)
    print(
        f"{'batch':>5} {'decode tok/s':>12} {'per seq':>8} {'ms/step':>8} {'end-to-end tok/s':>16}"
    )
    for batch in args.batches:
        prompts = [
            rng.integers(3, CONFIG["vocab_size"], args.prompt).tolist() for _ in range(batch)
        ]
        timed_generate(llm, prompts, 2)  # warm-up
        first = min(timed_generate(llm, prompts, 1) for _ in range(args.repeats))
        whole = min(timed_generate(llm, prompts, 1 + args.decode) for _ in range(args.repeats))
        decode = whole - first
        rate = batch * args.decode / decode
        print(
            f"{batch:>5} {rate:>12.1f} {rate / batch:>8.1f} {1e3 * decode / args.decode:>8.1f} "
            f"{batch * (1 + args.decode) / whole:>16.1f}"
        )


if __name__ == "__main__":
    main()
