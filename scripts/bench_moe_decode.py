"""Decode tokens/s of a Mixtral-style MoE against dense Llamas of equal active and total size.

Three random-weight float32 checkpoints share attention, embeddings and depth:
- moe:          E experts of width I, top-k routing (active MLP width k * I);
- dense-active: one MLP of width k * I, the same parameters per token as the MoE;
- dense-total:  one MLP of width E * I, as many parameters as all the experts together.
If experts are gathered (only the selected ones read), the MoE decodes near dense-active;
computing every expert would put it at or below dense-total.

    python scripts/bench_moe_decode.py [--experts 8] [--top-k 2] [--expert-width 1024]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import relaxlm
from relaxlm.runtime.model import CompiledModel
from relaxlm.testing.tiny_models import make_model


def _checkpoints(root: Path, args) -> dict[str, tuple[Path, int]]:
    """name -> (checkpoint folder, MLP parameters streamed per decoded token)."""
    base = {
        "hidden_size": args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-5,
        "vocab_size": 32000,
    }
    mlp = 3 * args.hidden * args.expert_width * args.layers  # one expert, all layers
    specs = {
        "moe": (
            "MixtralForCausalLM",
            {
                "intermediate_size": args.expert_width,
                "num_local_experts": args.experts,
                "num_experts_per_tok": args.top_k,
            },
            args.top_k * mlp,
        ),
        "dense-active": (
            "LlamaForCausalLM",
            {"intermediate_size": args.top_k * args.expert_width},
            args.top_k * mlp,
        ),
        "dense-total": (
            "LlamaForCausalLM",
            {"intermediate_size": args.experts * args.expert_width},
            args.experts * mlp,
        ),
    }
    out = {}
    for name, (arch, extra, mlp_params) in specs.items():
        folder = make_model(root / name, arch, base_config={**base, **extra})
        out[name] = (folder, mlp_params)
    return out


def _decode_tok_s(model: CompiledModel, prompt: list[int], steps: int) -> float:
    """Greedy decode steps per second of one sequence, straight on the compiled model."""
    model.add_sequence(0)
    try:
        logits = model.prefill([0], [prompt])[0]
        start = time.perf_counter()
        for _ in range(steps):
            logits = model.decode([0], [int(np.argmax(logits))])[0]
        return steps / (time.perf_counter() - start)
    finally:
        model.remove_sequence(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--expert-width", type=int, default=1024)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens before decoding")
    parser.add_argument("--steps", type=int, default=64, help="decode steps per run")
    parser.add_argument("--runs", type=int, default=3, help="runs per model; the median is kept")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="relaxlm-moe-bench-") as tmp:
        root = Path(tmp)
        rows = []
        for name, (folder, mlp_params) in _checkpoints(root, args).items():
            start = time.perf_counter()
            artifact = relaxlm.compile(folder, output=root / f"{name}-artifact", progress=False)
            compile_s = time.perf_counter() - start
            model = CompiledModel(artifact, max_batch_size=1)
            # Weights streamed per token: everything but the embedding table (one row read).
            streamed = sum(
                int(np.prod(p["shape"])) * 4
                for p in model.manifest.params
                if "embed_tokens" not in p["name"] and "experts" not in p["name"]
            )
            streamed += (mlp_params * 4) if name == "moe" else 0
            prompt = list(range(5, 5 + args.prompt))
            _decode_tok_s(model, prompt, 8)  # warm-up
            tok_s = statistics.median(
                _decode_tok_s(model, prompt, args.steps) for _ in range(args.runs)
            )
            rows.append((name, compile_s, streamed / 1e6, tok_s))
            del model

    print(
        f"hidden {args.hidden}, {args.layers} layers, {args.experts} experts of width "
        f"{args.expert_width}, top-{args.top_k}; float32; {args.steps} decode steps, "
        f"median of {args.runs}"
    )
    print(f"{'model':<14}{'compile s':>10}{'MB/token':>10}{'decode tok/s':>14}{'GB/s':>8}")
    for name, compile_s, mb, tok_s in rows:
        print(f"{name:<14}{compile_s:>10.1f}{mb:>10.0f}{tok_s:>14.1f}{mb * tok_s / 1e3:>8.1f}")


if __name__ == "__main__":
    main()
