"""relaxlm against llama.cpp and transformers on the same model, side by side in one run.

For each model shape (random-weight Llamas made here, fp16 safetensors) and each format
pair (relaxlm q4-a8 and q4 / llama.cpp Q4_0, q8 / Q8_0, float16 / F16), plus transformers fp32: a
128-token prompt then 128 greedy tokens, same thread count, engines alternated and each run
in a fresh process (best of `--rounds`). Prints tokens/s, the ratio to llama.cpp, and the
fraction of the memory-bandwidth roofline (bandwidth measured here, once per round, by a small
C reader compiled with gcc; bytes per token = weights read per decode step, i.e. all but
the embedding table).

    python scripts/bench_peers.py --models llama134m --threads 2 --rounds 3

With `--gguf FILE ...` (`default` for the default model's file) it runs relaxlm and llama.cpp
on the same GGUF files instead: relaxlm keeps the file's blocks (and, with `--requant SCHEME`,
also runs the file converted to SCHEME), llama.cpp reads the file.

    python scripts/bench_peers.py --gguf default --threads 2 --rounds 3 --requant q4-a8
    python scripts/bench_peers.py --gguf llama860m:Q4_K_M --requant gguf-a8 --no-blocks

`--cpus cpu cpu:haswell` builds relaxlm's artifacts for each of those CPUs (this one must run
their code): an AVX2 machine's path measured on this one (llama.cpp keeps this CPU's kernels).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {  # the shapes of shared/notes/peers.md
    "llama134m": dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        intermediate_size=2048,
    ),
    "llama860m": dict(
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=5632,
    ),
}
# q4-a8 (int8 activations) computes as llama.cpp's Q4_0 does; q4 stays exact against float
# activations (on a VNNI CPU it rounds them to 22-bit integers, see compiler/int8_dot.py).
PAIRS = [("q4-a8", "Q4_0"), ("q4", "Q4_0"), ("q8", "Q8_0"), ("float16", "F16")]

# Streams 2 GiB with four independent vector sums per thread (one horizontal sum per thread at
# the end: a horizontal sum per vector made this compute-bound, ~50 GB/s when loads ran at 80).
_BANDWIDTH_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <omp.h>
#include <immintrin.h>
int main(void) {
    size_t n = (size_t)1 << 28;  /* 2 GiB of doubles */
    double *a = aligned_alloc(64, n * sizeof(double));
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) a[i] = 1.0;
    double best = 1e30, sink = 0;
    for (int r = 0; r < 5; r++) {
        double t = omp_get_wtime(), s = 0;
        #pragma omp parallel reduction(+:s)
        {
            __m512d s0 = _mm512_setzero_pd(), s1 = s0, s2 = s0, s3 = s0;
            #pragma omp for
            for (size_t i = 0; i < n; i += 32) {
                s0 = _mm512_add_pd(s0, _mm512_load_pd(a + i));
                s1 = _mm512_add_pd(s1, _mm512_load_pd(a + i + 8));
                s2 = _mm512_add_pd(s2, _mm512_load_pd(a + i + 16));
                s3 = _mm512_add_pd(s3, _mm512_load_pd(a + i + 24));
            }
            s += _mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(s0, s1), _mm512_add_pd(s2, s3)));
        }
        t = omp_get_wtime() - t; sink += s; if (t < best) best = t;
    }
    printf("%f %f\n", n * sizeof(double) / best / 1e9, sink);
    return 0;
}
"""


def bandwidth_gbs(threads: int, work: Path) -> float:
    src, exe = work / "bw.c", work / "bw"
    if not exe.exists() or src.read_text() != _BANDWIDTH_C:
        src.write_text(_BANDWIDTH_C)
        subprocess.run(
            ["gcc", "-O3", "-march=native", "-fopenmp", str(src), "-o", str(exe)], check=True
        )
    out = subprocess.run(
        [str(exe)],
        env={**os.environ, "OMP_NUM_THREADS": str(threads)},
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.split()[0])


def make_checkpoint(shape: str, work: Path) -> Path:
    out = work / shape
    if (out / "model.safetensors").exists() or (out / "model.safetensors.index.json").exists():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from relaxlm.testing.tiny_models import make_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], vocab_size=32000, max_position_embeddings=2048)
    LlamaForCausalLM(config).to(torch.float16).save_pretrained(out)
    make_tokenizer(out)  # a tiny tokenizer: benchmarks feed token ids
    return out


def prepare(shape: str, work: Path, pairs: list[tuple[str, str]]) -> dict:
    """Checkpoint, relaxlm artifacts and GGUF files for one shape (cached in `work`)."""
    from relaxlm.cache import cached_artifact
    from relaxlm.testing.llama_gguf import quantize_gguf, write_llama_gguf

    ckpt = make_checkpoint(shape, work)
    f16 = work / f"{shape}-F16.gguf"
    if not f16.exists():
        write_llama_gguf(ckpt, f16, "F16")
    files = {"ckpt": str(ckpt), "gguf": {"F16": str(f16)}, "relaxlm": {}}
    for ours, theirs in pairs:
        gguf_file = work / f"{shape}-{theirs}.gguf"
        if theirs != "F16" and not gguf_file.exists():
            quantize_gguf(f16, gguf_file, theirs)
        files["gguf"][theirs] = str(gguf_file)
        # Through the compile cache: its key covers the compiler's sources, so a changed
        # compiler never benchmarks a stale artifact.
        artifact = cached_artifact(ckpt, target="cpu", quant=ours, dtype="float32")
        files["relaxlm"][ours] = str(artifact)
    return files


# -- one measurement, run in a fresh process ----------------------------------------------


def _measure(engine: str, path: str, threads: int, prompt: int, decode: int) -> dict:
    import time

    import numpy as np

    from relaxlm.bench import peak_rss_mib

    ids = np.random.default_rng(0).integers(3, 32000, prompt).tolist()
    if engine == "relaxlm":
        import relaxlm
        from relaxlm.bench import bench_llm

        llm = relaxlm.LLM(path, threads=threads) if _takes_threads() else relaxlm.LLM(path)
        r = bench_llm(llm, prompt, decode, repeats=2)
        return {
            "prefill": r.prefill_tok_s,
            "decode": r.decode_tok_s,
            "ttft": r.ttft_s,
            "rss": r.peak_rss_mib,
        }
    if engine == "llama.cpp":
        import llama_cpp

        llm = llama_cpp.Llama(
            path, n_threads=threads, n_threads_batch=threads, n_ctx=512, n_batch=512, verbose=False
        )
        best = {"prefill": 0.0, "decode": 0.0, "ttft": 1e9}
        for _ in range(2):
            llm.reset()
            start = time.perf_counter()
            llm.eval(ids)
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            ttft = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(decode):
                llm.eval([token])
                token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            dt = time.perf_counter() - start
            best = {
                "prefill": max(best["prefill"], prompt / ttft),
                "decode": max(best["decode"], decode / dt),
                "ttft": min(best["ttft"], ttft),
            }
        return {**best, "rss": peak_rss_mib()}
    if engine == "transformers":
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        x = torch.tensor([ids])
        best = {"prefill": 0.0, "decode": 0.0, "ttft": 1e9}
        with torch.no_grad():
            for _ in range(2):
                start = time.perf_counter()
                model(x)
                ttft = time.perf_counter() - start
                start = time.perf_counter()
                model.generate(
                    x,
                    max_new_tokens=decode + 1,
                    min_new_tokens=decode + 1,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=0,
                )
                dt = time.perf_counter() - start - ttft
                best = {
                    "prefill": max(best["prefill"], prompt / ttft),
                    "decode": max(best["decode"], decode / dt),
                    "ttft": min(best["ttft"], ttft),
                }
        return {**best, "rss": peak_rss_mib()}
    raise ValueError(engine)


def _takes_threads() -> bool:
    import inspect

    import relaxlm

    return "threads" in inspect.signature(relaxlm.LLM).parameters


def measure(engine: str, path: str, threads: int, prompt: int, decode: int) -> dict:
    env = {**os.environ, "TVM_NUM_THREADS": str(threads), "RELAXLM_THREADS": str(threads)}
    call = f"b._measure({engine!r}, {path!r}, {threads}, {prompt}, {decode})"
    code = f"import json, bench_peers as b; print(json.dumps({call}))"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT / "scripts", capture_output=True, text=True
    )
    if out.returncode != 0:
        raise RuntimeError(f"{engine} on {path} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def weight_bytes_per_token(engine: str, path: str) -> int:
    """Bytes of weights a decode step streams: all but the embedding table (unless it is tied
    to the output head, which reads all of it)."""
    if engine == "relaxlm":
        from relaxlm.artifacts import Manifest, weight_index

        index = weight_index(Path(path), Manifest.read(path))
        tied = not any(n.startswith("lm_head") for n in index)
        return sum(
            i.nbytes for n, i in index.items() if tied or not n.startswith("model.embed_tokens")
        )
    import gguf

    reader = gguf.GGUFReader(path)
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    return sum(int(t.n_bytes) for t in reader.tensors if tied or t.name != "token_embd.weight")


def gguf_file(name: str, work: Path) -> Path:
    """`default`, a path, or SHAPE:TYPE (a random-weight Llama of SHAPES quantized to TYPE by
    llama.cpp's quantizer, cached in `work`)."""
    from relaxlm.default_model import default_model
    from relaxlm.testing.llama_gguf import quantize_gguf, write_llama_gguf

    if name == "default":
        return default_model()
    shape, _, ftype = name.partition(":")
    if shape not in SHAPES or not ftype:
        return Path(name)
    f16 = work / f"{shape}-F16.gguf"
    if not f16.exists():
        write_llama_gguf(make_checkpoint(shape, work), f16, "F16")
    out = work / f"{shape}-{ftype}.gguf"
    if ftype != "F16" and not out.exists():
        quantize_gguf(f16, out, ftype)
    return f16 if ftype == "F16" else out


def gguf_runs(
    files: list[str], requant: list[str], work: Path, blocks: bool = True, cpus=("cpu",)
) -> list[tuple[str, list[tuple]]]:
    """Per GGUF file: (title, runs), relaxlm on the file's blocks (unless not `blocks`) and
    converted to each `requant` scheme, for each of `cpus`, then llama.cpp on the file,
    compiled through the cache first."""
    from relaxlm.cache import cached_artifact

    out = []
    for name in files:
        path = gguf_file(name, work)
        runs = []
        for cpu in cpus:
            for quant in ["none", *requant] if blocks else requant:
                artifact = cached_artifact(path, target=cpu, quant=quant, dtype="float32")
                fmt = "gguf blocks" if quant == "none" else quant
                fmt += f" ({cpu})" if cpu != "cpu" else ""
                runs.append(("relaxlm", fmt, str(artifact)))
        runs.append(("llama.cpp", "gguf", str(path)))
        out.append((path.name, runs))
    return out


def run_alternated(runs: list[tuple], args, work: Path) -> tuple[dict, float]:
    """Each run once per round, engines alternated so drift on the host hits all alike; the
    best figure of each, and the best of one bandwidth measurement per round."""
    results: dict[tuple, list[dict]] = {}
    bw = 0.0
    for _ in range(args.rounds):
        bw = max(bw, bandwidth_gbs(args.threads, work))
        for engine, fmt, path in runs:
            results.setdefault((engine, fmt), []).append(
                measure(engine, path, args.threads, args.prompt, args.decode)
            )
    best = {
        k: {m: (min if m in ("ttft", "rss") else max)(r[m] for r in v) for m in v[0]}
        for k, v in results.items()
    }
    return best, bw


def main_gguf(args, work: Path) -> None:
    for title, runs in gguf_runs(args.gguf, args.requant, work, not args.no_blocks, args.cpus):
        best, bw = run_alternated(runs, args, work)
        print(
            f"## {title}: {args.prompt}-token prompt, {args.decode} greedy tokens, "
            f"{args.threads} threads, best of {args.rounds}; memory bandwidth {bw:.1f} GB/s"
        )
        print(
            "| engine | weights | MB/token | prefill tok/s | decode tok/s | TTFT ms "
            "| peak RSS MiB | prefill vs llama.cpp | decode vs llama.cpp | roofline |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        peer = best[("llama.cpp", "gguf")]
        for engine, fmt, path in runs:
            r = best[(engine, fmt)]
            mb = weight_bytes_per_token(engine, path) / 1e6
            print(
                f"| {engine} | {fmt} | {mb:.0f} | {r['prefill']:.0f} | {r['decode']:.1f} "
                f"| {r['ttft'] * 1e3:.0f} | {r['rss']:.0f} | {r['prefill'] / peer['prefill']:.2f}x "
                f"| {r['decode'] / peer['decode']:.2f}x | {r['decode'] * mb / 1e3 / bw:.0%} |"
            )
        print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["llama134m"], choices=list(SHAPES))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "relaxlm-bench"))
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument(
        "--formats",
        nargs="+",
        default=[ours for ours, _ in PAIRS],
        choices=[ours for ours, _ in PAIRS],
        help="relaxlm formats to run (each with its llama.cpp peer)",
    )
    ap.add_argument(
        "--gguf",
        nargs="+",
        metavar="FILE",
        help="benchmark these GGUF files instead of --models (`default`: the default model's; "
        "SHAPE:TYPE, e.g. llama860m:Q4_K_M, a random-weight model of that shape quantized by "
        "llama.cpp)",
    )
    ap.add_argument(
        "--no-blocks",
        action="store_true",
        help="with --gguf: skip relaxlm on the file's own blocks (slow on big models)",
    )
    ap.add_argument(
        "--requant",
        nargs="*",
        default=[],
        metavar="SCHEME",
        help="with --gguf: also run relaxlm on each file converted to these schemes",
    )
    ap.add_argument(
        "--cpus",
        nargs="+",
        default=["cpu"],
        metavar="TARGET",
        help="with --gguf: build relaxlm for each of these CPU targets (cpu, cpu:haswell, ...)",
    )
    args = ap.parse_args()
    pairs = [(ours, theirs) for ours, theirs in PAIRS if ours in args.formats]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.gguf:
        main_gguf(args, work)
        return
    for shape in args.models:
        files = prepare(shape, work, pairs)
        runs = [("relaxlm", ours, files["relaxlm"][ours]) for ours, _ in pairs]
        peers = dict.fromkeys(theirs for _, theirs in pairs)  # Q4_0 once for q4 and q4-a8
        runs += [("llama.cpp", theirs, files["gguf"][theirs]) for theirs in peers]
        if not args.no_transformers:
            runs.append(("transformers", "fp32", files["ckpt"]))
        best, bw = run_alternated(runs, args, work)
        print(
            f"## {shape}: {args.prompt}-token prompt, {args.decode} greedy tokens, "
            f"{args.threads} threads, best of {args.rounds}; memory bandwidth {bw:.1f} GB/s"
        )
        print(
            "| engine | format | MB/token | prefill tok/s | decode tok/s | TTFT ms "
            "| peak RSS MiB | decode vs llama.cpp | roofline |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for ours, theirs in pairs:
            for engine, fmt in (("relaxlm", ours), ("llama.cpp", theirs)):
                r = best[(engine, fmt)]
                path = files["relaxlm"][ours] if engine == "relaxlm" else files["gguf"][theirs]
                mb = weight_bytes_per_token(engine, path) / 1e6
                ratio = r["decode"] / best[("llama.cpp", theirs)]["decode"]
                roof = r["decode"] * mb / 1e3 / bw
                print(
                    f"| {engine} | {fmt} | {mb:.0f} | {r['prefill']:.0f} | {r['decode']:.1f} "
                    f"| {r['ttft'] * 1e3:.0f} | {r['rss']:.0f} | {ratio:.2f}x | {roof:.0%} |"
                )
        if not args.no_transformers:
            r = best[("transformers", "fp32")]
            print(
                f"| transformers | fp32 | - | {r['prefill']:.0f} | {r['decode']:.1f} "
                f"| {r['ttft'] * 1e3:.0f} | {r['rss']:.0f} | - | - |"
            )
        print()


if __name__ == "__main__":
    main()
