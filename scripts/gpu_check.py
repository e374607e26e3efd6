"""Check relaxlm on a GPU against transformers: every architecture, float32 / float16 / bfloat16.

    python scripts/gpu_check.py                          # compile here for cuda, then run
    python scripts/gpu_check.py --compile-only DIR       # on a build machine (nvcc, no GPU)
    python scripts/gpu_check.py --run-only DIR           # on the GPU machine (runtime-only TVM)

--compile-only builds tiny random-weight checkpoints of every GPU case
(relaxlm/testing/gpu_cases.py), compiles one artifact per case and dtype and writes
transformers' reference (logits after prefill and after each decode step, 16 greedy tokens, in
that dtype) beside it: DIR/<case>-<dtype>/{artifact/, reference.json}. --run-only needs only
relaxlm's runtime, numpy and a TVM runtime: no compiler, transformers or torch. Per artifact it
checks logits within the dtype's tolerance, 16 greedy tokens (all must equal for float32; for
16-bit dtypes, where near-ties may flip, the table shows how many lead before they differ), a
batch of 4 different prompts equal to each prompt alone, a decode step of 17 sequences through
`decode_batched` (CUDA float16 builds; compiler/batched_decode.py) within the tolerance of the
same step through decode, and a seeded sample reproducible; it prints one table and exits 1 if a
row fails.
`--device cpu --target cpu` runs the same check on the CPU (tests/test_gpu_check.py does).

`--kv-cache-dtype int8|fp8` compiles the artifacts with a quantized KV cache
(DIR/<case>-<dtype>-kv_<name>/); their reference is then relaxlm's own CPU build of the same
checkpoint and cache, run here at compile time (transformers keeps K and V in float; the CPU
kernels are checked against transformers with K/V rounded alike in tests/test_kv_quant.py), so
the row shows the GPU kernels reading packed pages against the CPU ones, at the dtype's tolerance.

`--gemm library` compiles them with prefill's GEMMs in cuBLAS (DIR/<case>-<dtype>-library/;
on the CPU numpy's BLAS, float32), against transformers as the others.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ALL_DTYPES = ("float32", "float16", "bfloat16")
PREFILL, DECODE, GREEDY = 10, 6, 16


def compile_cases(
    folder: Path,
    target: str,
    cases: list[str],
    dtypes: list[str],
    kv_cache_dtype: str = "auto",
    gemm: str = "tir",
) -> None:
    """Checkpoints, artifacts and references for every (case, dtype): transformers', or for a
    quantized KV cache relaxlm's CPU build's (see the module docstring)."""
    import relaxlm
    from relaxlm.testing import parity
    from relaxlm.testing.gpu_cases import make_case

    variant = "" if kv_cache_dtype == "auto" else f"-kv_{kv_cache_dtype}"
    variant += "" if gemm == "tir" else f"-{gemm}"
    for case in cases:
        checkpoint = make_case(folder / "checkpoints" / case, case)
        for dtype in dtypes:
            out = folder / f"{case}-{dtype}{variant}"
            start = time.perf_counter()
            relaxlm.compile(
                checkpoint,
                target=target,
                dtype=dtype,
                output=out / "artifact",
                progress=False,
                kv_cache_dtype=kv_cache_dtype,
                gemm=gemm,
            )
            model = parity.load_reference(checkpoint, dtype)
            vocab = model.config.vocab_size
            ids = parity.token_ids(vocab, PREFILL + DECODE)
            prompt = parity.token_ids(vocab, 8, seed=1)
            if kv_cache_dtype != "auto":
                logits, greedy = _cpu_reference(checkpoint, dtype, kv_cache_dtype, ids, prompt)
            else:
                logits = parity.reference_logits(model, ids, PREFILL)
                greedy = parity.reference_greedy(model, prompt, GREEDY)
            reference = {
                "case": case + variant,
                "dtype": dtype,
                "tolerance": parity.TOLERANCE[dtype],
                "token_ids": ids,
                "prefill": PREFILL,
                "logits": logits.tolist(),
                "greedy_prompt": prompt,
                "greedy": greedy,
            }
            (out / "reference.json").write_text(json.dumps(reference))
            seconds = time.perf_counter() - start
            print(f"compiled {case} {dtype} for {target} in {seconds:.1f} s", file=sys.stderr)


def _cpu_reference(checkpoint, dtype: str, kv_cache_dtype: str, ids: list[int], prompt):
    """Logits (as `reference_logits`) and greedy tokens of relaxlm's CPU build with this cache."""
    import relaxlm

    with tempfile.TemporaryDirectory(prefix="relaxlm-gpu-check-cpu-") as scratch:
        artifact = relaxlm.compile(
            checkpoint,
            target="cpu",
            dtype=dtype,
            output=Path(scratch) / "artifact",
            progress=False,
            kv_cache_dtype=kv_cache_dtype,
        )
        llm = relaxlm.LLM(str(artifact), device="cpu")
        logits = llm.score(ids, prefill=PREFILL)
        greedy = relaxlm.SamplingParams(max_tokens=GREEDY, temperature=0.0, ignore_eos=True)
        (result,) = llm.generate([prompt], greedy)
    return np.asarray(logits, np.float32), list(result.token_ids)


def check_artifact(folder: Path, device: str) -> dict:
    """One table row: relaxlm on `device` against the reference in `folder`."""
    import relaxlm

    ref = json.loads((folder / "reference.json").read_text())
    row = {"case": ref["case"], "dtype": ref["dtype"], "tolerance": ref["tolerance"]}
    try:
        # room for a batch that takes decode_batched
        llm = relaxlm.LLM(str(folder / "artifact"), device=device, max_batch_size=32)
        ours = llm.score(ref["token_ids"], prefill=ref["prefill"])
        want = np.asarray(ref["logits"], dtype=np.float32)
        error = np.abs(ours - want).max(axis=1) / np.ptp(want)  # as parity.logit_error
        row["prefill_error"], row["decode_error"] = float(error[0]), float(error[1:].max())
        greedy = relaxlm.SamplingParams(max_tokens=GREEDY, temperature=0.0, ignore_eos=True)
        (result,) = llm.generate([ref["greedy_prompt"]], greedy)
        row["greedy_equal"] = _common_prefix(result.token_ids, ref["greedy"])
        rng = np.random.default_rng(2)
        prompts = [rng.integers(5, llm.vocab_size, n).tolist() for n in (3, 9, 5, 12)]
        alone = [llm.generate([p], greedy)[0].token_ids for p in prompts]
        together = [r.token_ids for r in llm.generate(prompts, greedy)]
        row["batch_equals_alone"] = together == alone
        row["batched_error"] = batched_decode_error(llm.model, prompts)
        sample = relaxlm.SamplingParams(max_tokens=GREEDY, temperature=1.0, seed=7)
        first, second = (llm.generate([prompts[0]], sample)[0].token_ids for _ in range(2))
        row["seed_reproducible"] = first == second
    except Exception as e:  # a row, not a crash of the whole check
        row["error"] = f"{type(e).__name__}: {e}"
    row["ok"] = (
        "error" not in row
        and max(row["prefill_error"], row["decode_error"]) <= row["tolerance"]
        and (row["dtype"] != "float32" or row["greedy_equal"] == GREEDY)
        and row["batch_equals_alone"]
        and (row["batched_error"] or 0.0) <= row["tolerance"]
        and row["seed_reproducible"]
    )
    return row


def batched_decode_error(model, prompts: list[list[int]]) -> float | None:
    """One decode step of BATCHED_DECODE_MIN + 1 sequences (prefixes of `prompts`) through
    decode_batched against the same step through decode: max |difference| / the logits' range;
    None where the artifact has no decode_batched (compiler/batched_decode.py). Its GEMMs round
    differently from decode's kernels, so logits are compared, not greedy tokens (16-bit
    near-ties may flip)."""
    from relaxlm.artifacts.library_gemm import BATCHED_DECODE, BATCHED_DECODE_MIN

    entries = model.stages[0].entries
    if BATCHED_DECODE not in entries:
        return None
    count = BATCHED_DECODE_MIN + 1
    batch = [prompts[i % len(prompts)][: 2 + i % 7] for i in range(count)]

    def step() -> np.ndarray:
        seqs = [(1 << 20) + i for i in range(count)]  # ids no engine request uses
        for seq, prompt in zip(seqs, batch, strict=True):
            model.add_sequence(seq)
            model.prefill([seq], [prompt])
        logits = model.decode(seqs, [prompt[-1] for prompt in batch])
        for seq in seqs:
            model.remove_sequence(seq)
        return logits

    batched = step()
    with without_batched_decode(model):
        plain = step()
    return float(np.abs(batched - plain).max() / np.ptp(plain))


@contextlib.contextmanager
def without_batched_decode(model):
    """Within it, `model` decodes every batch through decode's own kernels (also
    bench_gpu.py's "bN gemv" column)."""
    from relaxlm.artifacts.library_gemm import BATCHED_DECODE

    entries = model.stages[0].entries
    kept = entries.pop(BATCHED_DECODE)
    try:
        yield
    finally:
        entries[BATCHED_DECODE] = kept


def _common_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens the two sequences share before they first differ."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def print_table(rows: list[dict], device: str) -> None:
    print(
        f"relaxlm vs transformers on {device} (logit error: max |diff| / logit range; "
        "-kv_ rows: vs relaxlm's CPU build with the same cache)"
    )
    header = "case        dtype     prefill  decode   tol     greedy  batch=alone  batched   "
    header += "seed  result"
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['case']:<11} {r['dtype']:<9} FAIL  {r['error'][:200]}")
            continue
        print(
            f"{r['case']:<11} {r['dtype']:<9} {r['prefill_error']:<8.2e} {r['decode_error']:<8.2e}"
            f" {r['tolerance']:<7g} {r['greedy_equal']:>2}/{GREEDY}   "
            f"{'yes' if r['batch_equals_alone'] else 'NO':<12} "
            f"{'-' if r['batched_error'] is None else format(r['batched_error'], '.2e'):<9} "
            f"{'yes' if r['seed_reproducible'] else 'NO':<5} {'ok' if r['ok'] else 'FAIL'}"
        )


def load_runtime_plugins(device: str) -> None:
    """With a runtime-only TVM (TVM_USE_RUNTIME_LIB=1: only libtvm_runtime.so loads), load the
    runtime's extra and device plugins from the tvm package's lib/ folder, as a full TVM would."""
    if os.environ.get("TVM_USE_RUNTIME_LIB") != "1":
        return
    import tvm

    if device == "cuda":  # its plugin links libcudart.so.13: torch's CUDA wheel has one
        from relaxlm.runtime.cuda_libraries import find_library

        wheels = ("cu13/lib/libcudart.so.13", "cuda_runtime/lib/libcudart.so.13")
        with contextlib.suppress(OSError):  # else the plugin's own load says what is missing
            ctypes.CDLL(
                find_library("RELAXLM_CUDART_LIBRARY", wheels, "libcudart.so.13"),
                mode=ctypes.RTLD_GLOBAL,
            )
    lib = Path(tvm.__file__).parent / "lib"
    names = ["libtvm_runtime_extra.so"] + (
        [f"libtvm_runtime_{device}.so"] if device != "cpu" else []
    )
    for name in names:
        if (lib / name).is_file():
            ctypes.CDLL(str(lib / name), mode=ctypes.RTLD_GLOBAL)


def run_all(folder: Path, device: str) -> list[dict]:
    load_runtime_plugins(device.split(":")[0])
    rows = [
        check_artifact(sub, device)
        for sub in sorted(folder.iterdir())
        if (sub / "reference.json").is_file()
    ]
    if not rows:
        raise SystemExit(f"no compiled case in {folder} (run --compile-only {folder} first)")
    print_table(rows, device)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--compile-only", metavar="DIR", type=Path)
    mode.add_argument("--run-only", metavar="DIR", type=Path)
    parser.add_argument("--target", default="cuda:sm_80,sm_90")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--cases", help="comma-separated GPU cases (default: all)")
    parser.add_argument("--dtypes", default=",".join(ALL_DTYPES))
    parser.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "int8", "fp8"))
    parser.add_argument(
        "--gemm", default="tir", choices=("tir", "library"), help="as relaxlm compile's"
    )
    args = parser.parse_args(argv)
    dtypes = args.dtypes.split(",")
    if bad := sorted(set(dtypes) - set(ALL_DTYPES)):
        parser.error(f"--dtypes: {', '.join(bad)} is not one of {', '.join(ALL_DTYPES)}")
    if args.run_only:
        rows = run_all(args.run_only, args.device)
        return 0 if all(r["ok"] for r in rows) else 1

    from relaxlm.testing.gpu_cases import GPU_CASES

    cases = args.cases.split(",") if args.cases else list(GPU_CASES)
    if bad := sorted(set(cases) - set(GPU_CASES)):
        parser.error(f"--cases: {', '.join(bad)} is not one of {', '.join(GPU_CASES)}")
    if args.compile_only:
        compile_cases(args.compile_only, args.target, cases, dtypes, args.kv_cache_dtype, args.gemm)
        return 0
    with tempfile.TemporaryDirectory(prefix="relaxlm-gpu-check-") as scratch:
        compile_cases(Path(scratch), args.target, cases, dtypes, args.kv_cache_dtype, args.gemm)
        rows = run_all(Path(scratch), args.device)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
