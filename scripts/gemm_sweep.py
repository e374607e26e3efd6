"""A decode step's weight GEMMs alone, through each schedule and batch size, on one GPU.

    python scripts/gemm_sweep.py --compile-only DIR [--target cuda:sm_90] [--shape llama-3-8b]
    python scripts/gemm_sweep.py --run-only DIR [--json OUT.json]         # on the GPU machine

Which tile decode_batched's GEMMs take (compiler/schedules/few_rows.py) and from which batch the
engine calls decode_batched at all (BATCHED_DECODE_MIN) are settled by how long a step's weight
GEMMs take per schedule and batch size. Only a GPU can say, and a lent one has minutes and no
compiler; so --compile-only builds here, without weights, one layer of `--shape` per `--quants`
(float16 compute), fused, and schedules its weight GEMMs every way:
- "gemv": decode's kernels, as decode runs them (DecodeGEMV: rows [batch, 1, k]);
- "tiles128": decode_batched's (rows [1, batch, k]) through dlight's tensor-core GEMM, 128x128
  tiles (prefill's schedule);
- "rRwWkK": decode_batched's through FewRowsMatmul with R rows, W warps of 16 columns and K
  reduction elements per pipelined step (TILES; the default is few_rows.py's);
into one library per quant, with a manifest of its functions and their parameters.
--run-only loads them (a runtime-only TVM will do) and gives each GEMM a model's worth of
weights, one uninitialized copy per layer (speed does not depend on the values; and no layer
finds the weights of the one before in L2), then times, per batch in `--batches`, each kernel
over all the layers, the logits head once: a decode step's weight GEMMs. The table gives the
step's milliseconds per schedule; for the fastest, tokens/s (batch / step) and the weight bytes
per second as a fraction of the device's copy bandwidth. The host's enqueue time is shown as
well: where it is near the step's, launches, not the GPU, bound the figure.

`--target cpu --device cpu --shape tiny` runs the same machinery on the CPU, with one schedule,
the CPU's ("cpu"): tests/test_gemm_sweep.py.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))

TILES = (  # (rows, warps, k per step); the first is few_rows.py's default
    (32, 4, 64),
    (16, 4, 64),
    (32, 2, 64),
    (32, 8, 64),
    (64, 4, 64),
    (16, 8, 64),
    (32, 2, 128),
    (32, 4, 128),
)
BATCHES = "1,4,8,16,32,64"
MANIFEST = "sweep.json"
SYMBOLIC = "b"  # a symbolic dimension in the manifest: the batch (or rows) at run time


# -- compile here ------------------------------------------------------------------------------


def compile_all(folder: Path, target: str, shape: str, quants: list[str]) -> None:
    from bench_gpu import SHAPES, hollow_checkpoint

    from relaxlm.compiler.targets import resolve_target
    from relaxlm.frontends import export, load_checkpoint

    preset = resolve_target(target)
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = hollow_checkpoint(folder / "checkpoint", shape, layers=1)
    exported = export(load_checkpoint(checkpoint), "float16")
    vocab = exported.config["vocab_size"]  # the head's n: a GEMM once per step, not per layer
    manifest = {"shape": shape, "layers": SHAPES[shape]["num_hidden_layers"], "libraries": {}}
    for quant in quants:
        start = time.perf_counter()
        functions = _scheduled_gemms(exported, preset, quant)
        library = f"gemms-{quant}.so"
        _build(functions, preset, folder / library)
        manifest["libraries"][library] = {
            "quant": quant,
            "functions": [_describe(name, f, variant, vocab) for name, variant, f in functions],
        }
        print(
            f"compiled {len(functions)} GEMMs ({quant}) in {time.perf_counter() - start:.0f} s",
            file=sys.stderr,
        )
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(folder / "checkpoint")  # the compile's input only


def _scheduled_gemms(exported, preset, quant: str) -> list[tuple]:
    """(function name, variant, scheduled PrimFunc) for each weight GEMM and schedule."""
    import tvm

    from relaxlm.artifacts.library_gemm import BATCHED_DECODE
    from relaxlm.compiler.pipeline import build_library
    from relaxlm.compiler.quantization import resolve_scheme
    from relaxlm.compiler.schedules import for_target
    from relaxlm.compiler.schedules.few_rows import FEW_ROWS, FewRowsMatmul
    from relaxlm.testing.ir import called_kernels

    mod, _, _ = build_library(
        exported, preset, resolve_scheme(quant), fused_only=True, batched_decode=preset.is_gpu
    )
    target = preset.target()
    default = for_target(preset)

    def scheduled(func):
        with target:
            return default(tvm.IRModule({"main": func}))["main"]

    out = []
    for kernel in called_kernels(mod, "decode", "NT_matmul"):
        out.append((kernel, "gemv" if preset.is_gpu else "cpu", scheduled(mod[kernel])))
    if preset.is_gpu:
        for kernel in called_kernels(mod, BATCHED_DECODE, "NT_matmul"):
            func = mod[kernel]
            out.append((kernel, "tiles128", scheduled(func.without_attr(FEW_ROWS))))
            for rows, warps, k_step in TILES:
                rule = FewRowsMatmul(rows=rows, warps=warps, k_step=k_step)
                with target:
                    sch = rule.apply(func, target, False)
                if sch is not None:
                    out.append((kernel, f"r{rows}w{warps}k{k_step}", sch.mod["main"]))
    return [(f"{kernel}__{variant}", variant, f) for kernel, variant, f in out]


def _build(functions: list[tuple], preset, path: Path) -> None:
    import tvm

    from relaxlm.compiler.targets import build_context

    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, _, f in functions})
    with build_context(preset):
        tvm.compile(mod, target=preset.target()).export_library(str(path))


def _describe(name: str, func, variant: str, vocab: int) -> dict:
    """What --run-only needs to call the function: each parameter's shape (SYMBOLIC for the
    batch) and dtype; which are weights (every dimension fixed); the GEMM's n and k."""
    from relaxlm.tvm_api import tirx

    params = []
    for p in func.params:
        dims = [int(d) if isinstance(d, tirx.IntImm) else SYMBOLIC for d in p.ty.shape]
        params.append({"shape": dims, "dtype": str(p.ty.dtype)})
    weights = [i for i, p in enumerate(params) if SYMBOLIC not in p["shape"]]
    n, k = params[-1]["shape"][-1], params[0]["shape"][-1]
    return {
        "name": name,
        "gemm": f"{n}x{k}",
        "variant": variant,
        "head": n == vocab,  # once per step; every other GEMM once per layer
        "params": params,
        "weights": weights,
    }


# -- run on the device ---------------------------------------------------------------------


def run_all(folder: Path, device: str, batches: list[int], repeats: int) -> dict:
    import tvm
    from bench_gpu import copy_bandwidth
    from gpu_check import load_runtime_plugins

    load_runtime_plugins(device.split(":")[0])
    manifest = json.loads((folder / MANIFEST).read_text())
    dev = tvm.device(device)
    result = {"shape": manifest["shape"], "copy_bandwidth": copy_bandwidth(device), "rows": []}
    for library, entry in manifest["libraries"].items():
        lib = tvm.runtime.load_module(str(folder / library))
        by_gemm: dict[str, list[dict]] = {}
        for function in entry["functions"]:
            by_gemm.setdefault(function["gemm"], []).append(function)
        for gemm, functions in by_gemm.items():
            copies = 1 if functions[0]["head"] else manifest["layers"]
            weights = _weights(functions[0], copies, dev)
            for batch in batches:
                for function in functions:
                    row = {
                        "quant": entry["quant"],
                        "gemm": gemm,
                        "variant": function["variant"],
                        "batch": batch,
                        "calls": copies,
                        "weight_bytes": _bytes(functions[0]) * copies,
                    }
                    try:
                        seconds, enqueue = _time(lib, function, weights, batch, dev, repeats)
                        row |= {"seconds": seconds * copies, "enqueue_seconds": enqueue * copies}
                    except Exception as e:  # a schedule that fails is a row, not a stop
                        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                        print(f"{function['name']} at batch {batch}: {row['error']}")
                    result["rows"].append(row)
            del weights
    return result


def _weights(function: dict, copies: int, dev) -> list[list]:
    import tvm

    shapes = [function["params"][i] for i in function["weights"]]
    return [[tvm.runtime.empty(p["shape"], p["dtype"], dev) for p in shapes] for _ in range(copies)]


def _bytes(function: dict) -> int:
    """Bytes of one copy of the GEMM's weights."""
    import numpy as np

    params = [function["params"][i] for i in function["weights"]]
    return sum(int(np.prod(p["shape"])) * np.dtype(p["dtype"]).itemsize for p in params)


def _time(lib, function: dict, weights: list[list], batch: int, dev, repeats: int):
    """Seconds per call over every copy of the weights, and the host's enqueue time per call."""
    import numpy as np
    import tvm

    f = lib[function["name"]]
    args = []
    for i, p in enumerate(function["params"]):
        if i in function["weights"]:
            args.append(None)
            continue
        shape = [batch if d == SYMBOLIC else d for d in p["shape"]]
        args.append(tvm.runtime.tensor(np.zeros(shape, p["dtype"]), dev))
    slots = [i for i in range(len(args)) if args[i] is None]

    def call(copy):
        for slot, array in zip(slots, copy, strict=True):
            args[slot] = array
        f(*args)

    call(weights[0])  # warm up (module load, first launch)
    dev.sync()
    start = time.perf_counter()
    for _ in range(repeats):
        for copy in weights:
            call(copy)
    enqueued = time.perf_counter()
    dev.sync()
    calls = repeats * len(weights)
    return (time.perf_counter() - start) / calls, (enqueued - start) / calls


def steps(result: dict) -> list[dict]:
    """Per quant, batch and schedule: a decode step's weight GEMMs, summed over its GEMMs."""
    table: dict[tuple, dict] = {}
    failed = {(r["quant"], r["batch"], r["variant"]) for r in result["rows"] if "error" in r}
    for row in result["rows"]:
        if (row["quant"], row["batch"], row["variant"]) in failed:
            continue  # a step with a GEMM missing is no step
        key = (row["quant"], row["batch"], row["variant"])
        step = table.setdefault(key, dict(zip(("quant", "batch", "variant"), key, strict=True)))
        for field in ("seconds", "enqueue_seconds", "weight_bytes"):
            step[field] = step.get(field, 0) + row[field]
        step["gemms"] = step.get("gemms", 0) + 1
    return list(table.values())


def print_table(result: dict) -> None:
    bandwidth = result["copy_bandwidth"]
    shape = result["shape"]
    print(f"# {shape}: a decode step's weight GEMMs; copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    rows = steps(result)
    variants = sorted({r["variant"] for r in rows}, key=lambda v: (v != "gemv", v))
    header = ["quant", "batch", *[f"{v} ms" for v in variants]]
    header += ["best", "tok/s", "of roofline", "host"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for quant in sorted({r["quant"] for r in rows}):
        for batch in sorted({r["batch"] for r in rows if r["quant"] == quant}):
            cells = {r["variant"]: r for r in rows if r["quant"] == quant and r["batch"] == batch}
            if not cells:  # every schedule failed: the rows say why
                continue
            best = min(cells.values(), key=lambda r: r["seconds"])
            fraction = best["weight_bytes"] / best["seconds"] / bandwidth
            line = [quant, str(batch)]
            line += [f"{cells[v]['seconds'] * 1e3:.3f}" if v in cells else "-" for v in variants]
            line += [
                best["variant"],
                f"{batch / best['seconds']:.0f}",
                f"{fraction:.0%}",
                f"{best['enqueue_seconds'] / best['seconds']:.0%}",
            ]
            print("| " + " | ".join(line) + " |")
    for verdict in verdicts(result):
        wins = verdict["batched_from"]
        print(
            f"{verdict['quant']}: decode_batched's fastest tile at {verdict['batch']} sequences "
            f"is {verdict['tile']}; it beats gemv "
            + (f"from {wins} sequences" if wins else "at no batch")
            + f" (the engine switches at {verdict['engine_from']}); {verdict['batch']} "
            f"sequences: {verdict['speedup']:.1f}x the tokens/s of one (GEMMs alone)"
        )


def verdicts(result: dict, batch: int = 32) -> list[dict]:
    """Per quant, what the table says for relaxlm's two choices: the fastest decode_batched
    schedule at `batch` sequences, the smallest batch from which it beats decode's (gemv), and
    `batch` sequences' tokens/s over one sequence's (each at its fastest)."""
    from relaxlm.artifacts.library_gemm import BATCHED_DECODE_MIN

    rows = steps(result)
    out = []
    for quant in sorted({r["quant"] for r in rows}):
        cells = {(r["batch"], r["variant"]): r["seconds"] for r in rows if r["quant"] == quant}
        batched = {v for _, v in cells if v != "gemv"}
        if not batched or (batch, "gemv") not in cells or (1, "gemv") not in cells:
            continue  # the CPU's sweep: one schedule
        tile = min((v for v in batched if (batch, v) in cells), key=lambda v: cells[batch, v])
        wins = sorted(b for b, v in cells if v == tile and cells[b, v] < cells.get((b, "gemv"), 0))
        one = min(t for (b, _), t in cells.items() if b == 1)
        many = min(t for (b, _), t in cells.items() if b == batch)
        out.append(
            {
                "quant": quant,
                "batch": batch,
                "tile": tile,
                "batched_from": wins[0] if wins else None,
                "engine_from": BATCHED_DECODE_MIN,
                "speedup": batch * one / many,
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--compile-only", type=Path, metavar="DIR")
    mode.add_argument("--run-only", type=Path, metavar="DIR")
    parser.add_argument("--target", default="cuda:sm_90")
    parser.add_argument("--shape", default="llama-3-8b")
    parser.add_argument("--quants", default="q4,none")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batches", default=BATCHES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.compile_only:
        compile_all(args.compile_only, args.target, args.shape, args.quants.split(","))
        return 0
    batches = [int(b) for b in args.batches.split(",")]
    result = run_all(args.run_only, args.device, batches, args.repeats)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
