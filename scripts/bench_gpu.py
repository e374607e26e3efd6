"""relaxlm against transformers (float16, eager) on one GPU, the same model shapes, in one run.

    python scripts/bench_gpu.py --compile-only DIR [--target cuda:sm_90] [--cuda-graph]
                                [--gemm-library]
    python scripts/bench_gpu.py --run-only DIR [--json OUT.json]     # on the GPU machine

--compile-only builds, without a GPU and without weights, an artifact per model shape
(`--shapes`: Llama-3.2-1B and Llama-3-8B) and format (`--formats`: q4 weights with float16
compute, float16): the checkpoint is a safetensors header over a sparse hole, the compile's
weights are zeros written as holes, and each weight shard travels as its header and its size
(DIR stays a few MB; speed does not depend on the weights' values). `--cuda-graph` also
compiles each with CUDA graphs (DIR/<shape>-<format>-graph), `--gemm-library` with prefill's
GEMMs in cuBLAS (DIR/<shape>-<format>-gemm_library; both: every combination). --run-only
refills the shards (header + truncate: the same bytes, so the same checksums), then measures
relaxlm's runtime and transformers (random weights, float16, on the same device): decode
tokens/s for 1 and `--batch` sequences (an artifact with `decode_batched` also through decode's
own kernels: column "bN gemv"), prefill tokens/s and time to first token for each
`--prompts` length, the roofline fraction (weight bytes read per token / the device's copy
bandwidth, measured here by a device-to-device copy: bytes read + bytes written per second)
and, for relaxlm, the VM's decode step alone (synchronized) and the engine's per-token time
beyond it (host overhead). One table; `--json` writes its rows. It needs only relaxlm's
runtime, a TVM runtime, torch and transformers (a runtime-only TVM as scripts/gpu_check.py
loads it).

`--device cpu --target cpu --shapes tiny` runs the same on the CPU (tests/test_bench_gpu.py).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import struct
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from gpu_check import load_runtime_plugins, without_batched_decode  # a sibling script

LLAMA3 = dict(
    vocab_size=128256,
    rope_theta=500000.0,
    max_position_embeddings=4096,  # the KV cache's size, not the speed: kept small
    bos_token_id=128000,
    eos_token_id=128001,
)
SHAPES = {
    "llama-3.2-1b": dict(
        LLAMA3,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        tie_word_embeddings=True,
        max_position_embeddings=16384,  # above the scaling's original 8192, as transformers asks
        rope_scaling=dict(
            rope_type="llama3",
            factor=32.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
    ),
    "llama-3-8b": dict(
        LLAMA3,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    ),
    "tiny": dict(  # the CPU test's
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    ),
}
FORMATS = {  # name -> (quant, dtype)
    "q4-float16": ("q4", "float16"),
    "float16": ("none", "float16"),
    "q4-float32": ("q4", "float32"),
    "float32": ("none", "float32"),
}
GRAPH_SUFFIX = "-graph"
LIBRARY_SUFFIX = "-gemm_library"  # compiled with --gemm library (cuBLAS on CUDA)
HOLLOW = "hollow.json"  # shard -> its size, in an artifact whose shards travel as headers


# -- compile here: no GPU, no weights ------------------------------------------------------


@contextlib.contextmanager
def holes_for_weights():
    """Safetensors shards written as their header over a sparse hole, and a compile whose
    converted weights are zeros: the same bytes as zero weights, never computed or written."""
    from relaxlm.artifacts.safetensors_io import ShardWriter
    from relaxlm.compiler import pipeline

    def skip(self, name, array):
        exp_name, shape, dtype = self._expected.pop(0)
        assert (name, tuple(array.shape), np.dtype(dtype)) == (exp_name, shape, array.dtype)
        self._file.seek(array.nbytes, 1)

    def close(self):
        assert not self._expected
        self._file.truncate()  # the file ends after the last hole
        self._file.close()

    def zeros(checkpoint, exported, plan, *args, **kwargs):
        # np.zeros maps pages lazily: a GB-sized zero table costs nothing until read.
        return ((w.name, np.zeros(w.shape, pipeline.dtype_of(w.dtype))) for w in plan)

    saved = ShardWriter.write, ShardWriter.close, pipeline.converted_weights
    ShardWriter.write, ShardWriter.close, pipeline.converted_weights = skip, close, zeros
    try:
        yield
    finally:
        ShardWriter.write, ShardWriter.close, pipeline.converted_weights = saved


def hollow_checkpoint(folder: Path, shape: str, layers: int | None = None) -> Path:
    """A Llama checkpoint of `shape` in float16 whose weights are a hole (config, tokenizer);
    `layers` of it where given."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from relaxlm.artifacts.safetensors_io import ShardWriter
    from relaxlm.testing.tiny_models import make_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**SHAPES[shape], torch_dtype="float16")
    config.num_hidden_layers = layers or config.num_hidden_layers
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    tensors = {n: p for n, p in model.state_dict().items()}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    layout = [(n, tuple(p.shape), np.dtype("float16")) for n, p in tensors.items()]
    with holes_for_weights():
        writer = ShardWriter(folder / "model.safetensors", layout)
        for name, shape_, dtype in layout:
            writer.write(name, np.zeros(shape_, dtype))
        writer.close()
    make_tokenizer(folder)  # benchmarks feed token ids; any tokenizer loads
    return folder


def hollow_out(artifact: Path) -> None:
    """Cut each weight shard to its safetensors header; HOLLOW records the sizes to refill."""
    sizes = {}
    for shard in sorted((artifact / "weights").glob("*.safetensors")):
        sizes[shard.name] = shard.stat().st_size
        with open(shard, "r+b") as f:
            header = struct.unpack("<Q", f.read(8))[0]
            f.truncate(8 + header)
    (artifact / HOLLOW).write_text(json.dumps(sizes))


def refill(artifact: Path) -> None:
    """Undo hollow_out: each shard back to its size, the rest zeros (a sparse hole)."""
    if not (artifact / HOLLOW).is_file():
        return
    for name, size in json.loads((artifact / HOLLOW).read_text()).items():
        with open(artifact / "weights" / name, "r+b") as f:
            f.truncate(size)


def compile_all(
    folder: Path, target: str, shapes, formats, cuda_graph: bool, gemm_library: bool = False
) -> None:
    import relaxlm

    variants = [
        (graph, gemm)
        for graph in ((False, True) if cuda_graph else (False,))
        for gemm in (("tir", "library") if gemm_library else ("tir",))
    ]
    for shape in shapes:
        checkpoint = hollow_checkpoint(folder / shape, shape)
        for fmt in formats:
            quant, dtype = FORMATS[fmt]
            for graph, gemm in variants:
                suffix = (GRAPH_SUFFIX if graph else "") + (LIBRARY_SUFFIX if gemm != "tir" else "")
                out = folder / f"{shape}-{fmt}{suffix}"
                out.mkdir(parents=True, exist_ok=True)
                start = time.perf_counter()
                try:
                    with holes_for_weights():
                        relaxlm.compile(
                            checkpoint,
                            output=out / "artifact",
                            target=target,
                            quant=quant,
                            dtype=dtype,
                            cuda_graph=graph,
                            gemm=gemm,
                            progress=False,
                            force=True,
                        )
                    hollow_out(out / "artifact")
                except Exception as e:  # a row that says so, not a stop of the whole run
                    (out / "error.txt").write_text(f"{type(e).__name__}: {e}")
                seconds = time.perf_counter() - start
                case = dict(shape=shape, format=fmt, cuda_graph=graph, gemm=gemm)
                (out / "case.json").write_text(json.dumps({**case, "compile_s": seconds}))
                print(f"compiled {out.name} for {target} in {seconds:.0f} s", file=sys.stderr)
        # Only the config travels (transformers builds its model from it): a copy would fill
        # the hole with GBs of zeros.
        (checkpoint / "model.safetensors").unlink()


# -- run on the device ---------------------------------------------------------------------


def copy_bandwidth(device: str) -> float:
    """Bytes read + written per second by a device-to-device copy of 1 GiB (best of 5)."""
    n = 1 << 30 if device != "cpu" else 1 << 28
    if device == "cpu":
        src, dst = np.ones(n, np.uint8), np.empty(n, np.uint8)
        best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(5))
        return 2 * n / best
    import torch

    src = torch.ones(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    best = min(_timed(lambda: (dst.copy_(src), torch.cuda.synchronize())) for _ in range(5))
    return 2 * n / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def weight_bytes_per_token(artifact: Path, manifest) -> int:
    """Bytes of weights one decode step reads: all but the embedding table (unless tied to
    the output head, which reads all of it); as scripts/bench_peers.py counts them."""
    from relaxlm.artifacts import weight_index

    index = weight_index(artifact, manifest)
    tied = not any(n.startswith("lm_head") for n in index)
    return sum(i.nbytes for n, i in index.items() if tied or not n.startswith("model.embed_tokens"))


def _prompts(vocab: int, count: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, length).tolist() for _ in range(count)]


def bench_relaxlm(artifact: Path, device: str, lengths, batch: int, steps: int, repeats: int):
    import relaxlm
    from relaxlm.artifacts.library_gemm import BATCHED_DECODE

    # A cache for the largest run, not the context window x batch: device memory stays free for
    # transformers after it (TVM's allocator keeps what it freed).
    tokens = batch * max(*lengths, 16 + steps + 1)
    llm = relaxlm.LLM(str(artifact), device=device, max_batch_size=batch, kv_cache_tokens=tokens)
    vocab = llm.vocab_size
    runs = iter(range(1 << 30))  # a new prompt each run: the prefix cache would serve one again

    def generate(count: int, length: int, tokens: int) -> float:
        params = relaxlm.SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        prompts = _prompts(vocab, count, length, next(runs))
        return _timed(lambda: llm.generate(prompts, params))

    # First, while the KV cache is empty (the engine's prefix cache keeps pages of earlier
    # prompts): the VM's own step.
    row = {"vm_step_ms": vm_decode_step(llm.model, repeats * 4) * 1e3}
    row |= speeds(generate, lengths, batch, steps, repeats)
    row["host_ms"] = 1e3 / row["decode_b1"] - row["vm_step_ms"]
    if BATCHED_DECODE in llm.model.stages[0].entries:  # the batch through decode's kernels too
        with without_batched_decode(llm.model):
            row[f"decode_b{batch}_gemv"] = decode_speed(generate, batch, steps, repeats)
    row["weight_bytes"] = weight_bytes_per_token(artifact, llm.manifest)
    return row


def speeds(generate, lengths, batch: int, steps: int, repeats: int) -> dict:
    """Prefill tok/s and TTFT per prompt length, decode tok/s of 1 and `batch` sequences (the
    time of `steps` more tokens over the time of the first, best of `repeats`), for either
    engine: generate(sequences, prompt length, tokens) -> seconds, greedy, synchronized."""
    generate(1, 8, 2)  # warm-up: first calls allocate (and capture CUDA graphs)
    generate(batch, 8, 2)
    row = {}
    for n in lengths:
        ttft = min(generate(1, n, 1) for _ in range(repeats))
        row[f"prefill_{n}"], row[f"ttft_{n}_ms"] = n / ttft, ttft * 1e3
    for count in (1, batch):
        row[f"decode_b{count}"] = decode_speed(generate, count, steps, repeats)
    return row


def decode_speed(generate, count: int, steps: int, repeats: int) -> float:
    """Tokens/s of `count` sequences decoding together (see `speeds`)."""
    first = min(generate(count, 16, 1) for _ in range(repeats))
    total = min(generate(count, 16, steps + 1) for _ in range(repeats))
    return count * steps / max(total - first, 1e-9)


def vm_decode_step(model, steps: int) -> float:
    """Seconds of the VM's decode function alone for one sequence, device synchronized: no
    engine, sampling, KV bookkeeping or logits copy (best of `steps`)."""
    import tvm
    from tvm.runtime import ShapeTuple

    seq = 1 << 20  # an id no engine request uses
    model.add_sequence(seq)
    model.prefill([seq], [[5] * 16])
    begin = tvm.get_global_func("vm.builtin.kv_state_begin_forward")
    end = tvm.get_global_func("vm.builtin.kv_state_end_forward")
    decode = model.vm["decode"]
    ids = tvm.runtime.tensor(np.array([[7]], "int32"), device=model.device)
    best = math.inf
    for _ in range(steps + 1):  # the first allocates
        begin(model.kv_cache, ShapeTuple([seq]), ShapeTuple([1]))
        model.device.sync()
        start = time.perf_counter()
        decode(ids, model.kv_cache, model.params)
        model.device.sync()
        best = min(best, time.perf_counter() - start)
        end(model.kv_cache)
    model.remove_sequence(seq)
    return best


def bench_transformers(config_dir: Path, device: str, lengths, batch: int, steps: int, repeats):
    """Eager transformers in float16, random weights made on the device, greedy with its KV
    cache: the same measurements as relaxlm's (no VM step)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16).eval()
    sync = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
    seeds = iter(range(1 << 30))

    def generate(count: int, length: int, tokens: int) -> float:
        ids = torch.tensor(_prompts(config.vocab_size, count, length, next(seeds)), device=device)

        def run():
            out = model(ids, use_cache=True)
            token, past = out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values
            for _ in range(tokens - 1):
                out = model(token, past_key_values=past, use_cache=True)
                token, past = out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values
            token.tolist()  # on the host, as relaxlm's tokens are
            sync()

        with torch.no_grad():
            return _timed(run)

    row = speeds(generate, lengths, batch, steps, repeats)
    tied = config.tie_word_embeddings
    row["weight_bytes"] = sum(
        p.numel() * p.element_size()
        for n, p in model.named_parameters()
        if tied or "embed_tokens" not in n
    )
    row["vm_step_ms"] = row["host_ms"] = None
    return row


def release_device_memory() -> None:
    """The last model's device memory back to the driver before the next loads: TVM's pooled
    allocator (and torch's cache) keep what is freed."""
    import tvm

    gc.collect()
    tvm.get_global_func("vm.builtin.memory_manager.clear")()
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
        sys.modules["torch"].cuda.empty_cache()


def run_all(folder: Path, device: str, lengths, batch: int, steps: int, repeats: int, hf: bool):
    load_runtime_plugins(device.split(":")[0])
    bandwidth = copy_bandwidth(device)
    rows, shapes = [], []
    for case_dir in sorted(p for p in folder.iterdir() if (p / "case.json").is_file()):
        case = json.loads((case_dir / "case.json").read_text())
        row = {"engine": "relaxlm", **case}
        if case["shape"] not in shapes:
            shapes.append(case["shape"])
        if (case_dir / "error.txt").is_file():
            row["error"] = "compile: " + (case_dir / "error.txt").read_text()
        else:
            try:
                refill(case_dir / "artifact")
                row.update(
                    bench_relaxlm(case_dir / "artifact", device, lengths, batch, steps, repeats)
                )
            except Exception as e:
                traceback.print_exc()
                row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
        release_device_memory()
    for shape in shapes if hf else []:
        row = dict(
            engine="transformers", shape=shape, format="float16", cuda_graph=False, gemm="torch"
        )
        try:
            row.update(bench_transformers(folder / shape, device, lengths, batch, steps, repeats))
        except Exception as e:
            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
        release_device_memory()
    for row in rows:
        if "weight_bytes" in row:
            row["roofline"] = row["decode_b1"] * row["weight_bytes"] / bandwidth
    if not rows:
        raise SystemExit(f"no compiled case in {folder} (run --compile-only {folder} first)")
    return {"device": device, "copy_bandwidth_gbs": bandwidth / 1e9, "rows": rows}


def print_table(result: dict, lengths, batch: int) -> None:
    print(
        f"relaxlm vs transformers (float16, eager) on {result['device']}; "
        f"copy bandwidth {result['copy_bandwidth_gbs']:.1f} GB/s (read + write)"
    )
    columns = [
        ("engine", "engine", "{}"),
        ("shape", "shape", "{}"),
        ("format", "format", "{}"),
        ("graph", "cuda_graph", "{}"),
        ("gemm", "gemm", "{}"),
        ("dec b1", "decode_b1", "{:.1f}"),
        (f"dec b{batch}", f"decode_b{batch}", "{:.1f}"),
        (f"b{batch} gemv", f"decode_b{batch}_gemv", "{:.1f}"),  # without decode_batched
        *((f"pre {n}", f"prefill_{n}", "{:.0f}") for n in lengths),
        *((f"ttft{n} ms", f"ttft_{n}_ms", "{:.2f}") for n in lengths),
        ("GB/tok", "weight_bytes", "{:.4g}"),
        ("roofline", "roofline", "{:.1%}"),
        ("vm ms", "vm_step_ms", "{:.3f}"),
        ("host ms", "host_ms", "{:.3f}"),
    ]
    cells = []
    for row in result["rows"]:
        line = []
        for _, key, fmt in columns:
            value = row.get(key)
            if key == "weight_bytes" and value is not None:
                value = value / 1e9
            if key == "cuda_graph":
                value = "yes" if value else "no"
            line.append("-" if value is None else fmt.format(value))
        cells.append(line)
    widths = [max(len(c[0]), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
    print("  ".join(name.ljust(w) for (name, _, _), w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row, line in zip(result["rows"], cells, strict=True):
        if "error" in row:
            head = "  ".join(v.ljust(w) for v, w in zip(line[:4], widths, strict=False))
            print(f"{head}  FAIL {row['error'][:300]}")
            continue
        print("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)))
    print("tokens/s (dec bN: N sequences, all their tokens); roofline: dec b1 x GB/tok / copy")
    print("bandwidth; vm ms: the decode function alone, synchronized; host ms: the engine's")
    print("per-token time beyond it (scheduling, sampling, KV bookkeeping, logits copy)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--compile-only", metavar="DIR", type=Path)
    mode.add_argument("--run-only", metavar="DIR", type=Path)
    parser.add_argument("--target", default="cuda:sm_90")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shapes", default="llama-3.2-1b,llama-3-8b")
    parser.add_argument("--formats", default="q4-float16,float16")
    parser.add_argument("--cuda-graph", action="store_true", help="also compile with it")
    parser.add_argument(
        "--gemm-library", action="store_true", help="also compile with --gemm library (cuBLAS)"
    )
    parser.add_argument("--prompts", default="128,1024", help="prefill lengths (tokens)")
    parser.add_argument("--batch", type=int, default=32, help="sequences decoded together")
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed")
    parser.add_argument("--repeats", type=int, default=2, help="best of that many")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--json", type=Path, help="write the table's rows here")
    args = parser.parse_args(argv)
    shapes, formats = args.shapes.split(","), args.formats.split(",")
    if bad := sorted(set(shapes) - set(SHAPES)):
        parser.error(f"--shapes: {', '.join(bad)} is not one of {', '.join(SHAPES)}")
    if bad := sorted(set(formats) - set(FORMATS)):
        parser.error(f"--formats: {', '.join(bad)} is not one of {', '.join(FORMATS)}")
    if args.compile_only:
        compile_all(
            args.compile_only, args.target, shapes, formats, args.cuda_graph, args.gemm_library
        )
        return 0
    lengths = [int(n) for n in args.prompts.split(",")]
    result = run_all(
        args.run_only,
        args.device,
        lengths,
        args.batch,
        args.steps,
        args.repeats,
        not args.no_transformers,
    )
    print_table(result, lengths, args.batch)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 1 if any("error" in r for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
