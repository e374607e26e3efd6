"""scripts/gemm_sweep.py: a decode step's weight GEMMs per schedule and batch size.

On the CPU, the whole machinery (compile, manifest, load, time, table) with the CPU's one
schedule; for CUDA, that every schedule the sweep times is built for decode_batched's GEMMs
(tensor cores, each tile of TILES) and, where nvcc is installed, compiles.
"""

import json
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
import gemm_sweep  # a script, beside the package


def test_on_the_cpu_it_times_each_gemm_and_sums_a_step(tmp_path, capsys):
    folder = tmp_path / "sweep"
    args = ["--compile-only", str(folder), "--target", "cpu", "--shape", "tiny"]
    assert gemm_sweep.main(args) == 0
    manifest = json.loads((folder / gemm_sweep.MANIFEST).read_text())
    assert manifest["layers"] == 2 and not (folder / "checkpoint").exists()
    for library, entry in manifest["libraries"].items():
        assert (folder / library).is_file()
        # fused qkv, o, fused gate/up, down, the logits head (once a step)
        assert len(entry["functions"]) == 5
        assert [f["head"] for f in entry["functions"]].count(True) == 1
        assert {f["variant"] for f in entry["functions"]} == {"cpu"}
    capsys.readouterr()
    out = tmp_path / "sweep.json"
    args = ["--run-only", str(folder), "--device", "cpu", "--batches", "1,3", "--json", str(out)]
    assert gemm_sweep.main([*args, "--repeats", "1"]) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert len(result["rows"]) == 2 * 5 * 2  # quants x GEMMs x batches
    assert all(r["seconds"] > 0 and "error" not in r for r in result["rows"])
    steps = {(s["quant"], s["batch"]): s for s in gemm_sweep.steps(result)}
    assert set(steps) == {(q, b) for q in ("q4", "none") for b in (1, 3)}
    # a step reads every layer's weights once: 4 GEMMs x 2 layers, and the head
    assert all(s["gemms"] == 5 for s in steps.values())
    gemms = [f["gemm"] for f in manifest["libraries"]["gemms-none.so"]["functions"]]
    heads = [f["head"] for f in manifest["libraries"]["gemms-none.so"]["functions"]]
    shapes = [
        (int(n), int(k), 1 if head else 2)
        for (n, k), head in zip((g.split("x") for g in gemms), heads, strict=True)
    ]
    # float16: 2 bytes a weight; q4: 4 bits and a float16 scale per 32, k padded to blocks of
    # 128 (quantization.py's interleave): 64 + 8 bytes a block
    assert steps["none", 1]["weight_bytes"] == sum(n * k * 2 * c for n, k, c in shapes)
    q4 = sum(n * -(-k // 128) * 72 * c for n, k, c in shapes)
    assert steps["q4", 1]["weight_bytes"] == q4
    assert "| q4 | 3 |" in table and "| none | 1 |" in table


def test_for_cuda_every_schedule_is_built(wide_llama):
    from relaxlm.compiler.targets import resolve_target
    from relaxlm.frontends import export
    from relaxlm.testing.cuda_matrix import fatbin_summary

    preset = resolve_target("cuda:sm_90")
    functions = gemm_sweep._scheduled_gemms(export(wide_llama, "float16"), preset, "q4")
    variants = {}
    for name, variant, func in functions:
        variants.setdefault(variant, []).append((name, func.script()))
    tiles = [f"r{r}w{w}k{k}" for r, w, k in gemm_sweep.TILES]
    assert set(variants) == {"gemv", "tiles128", *tiles}
    assert all(len(v) == 5 for v in variants.values()), {k: len(v) for k, v in variants.items()}
    for variant, kernels in variants.items():
        for name, script in kernels:
            assert ("T.tvm_mma_sync" in script) == (variant != "gemv"), name
    for (rows, _, _), variant in zip(gemm_sweep.TILES, tiles, strict=True):
        pad = f"T.int64({rows - 1})) // T.int64({rows})"
        assert all(pad in script for _, script in variants[variant]), variant
    if shutil.which("nvcc") is None:
        return
    with tempfile.TemporaryDirectory() as scratch:
        library = Path(scratch) / "gemms.so"
        gemm_sweep._build(functions, preset, library)
        sass = fatbin_summary(library.read_bytes())["sass"]
    assert {f"{name}_kernel" for name, _, _ in functions} <= set(sass["90"])  # TVM names them so


def test_the_verdict_reads_the_table(capsys):
    """The two numbers relaxlm fixes from a sweep: decode_batched's tile and the batch from
    which it beats decode's GEMV; and 32 sequences' speedup over one."""

    def row(batch, variant, ms):
        return {
            "quant": "q4",
            "gemm": "4096x4096",
            "variant": variant,
            "batch": batch,
            "calls": 1,
            "seconds": ms / 1e3,
            "enqueue_seconds": ms / 4e3,
            "weight_bytes": 10**9,
        }

    times = {"gemv": (1.0, 4.0, 8.0), "r32w4k64": (3.0, 2.0, 2.5), "tiles128": (5.0, 5.0, 5.0)}
    rows = [row(b, v, t) for v, ts in times.items() for b, t in zip((1, 16, 32), ts, strict=True)]
    result = {"shape": "llama-3-8b", "copy_bandwidth": 2e12, "rows": rows}
    (verdict,) = gemm_sweep.verdicts(result)
    assert verdict["tile"] == "r32w4k64" and verdict["batched_from"] == 16
    assert verdict["speedup"] == pytest.approx(32 * 1.0 / 2.5)
    gemm_sweep.print_table(result)
    table = capsys.readouterr().out
    # batch 1: gemv, 1 ms for 1 GB: 1,000 tok/s, half of 2 TB/s; the host enqueued in 1/4
    assert "| q4 | 1 | 1.000 | 3.000 | 5.000 | gemv | 1000 | 50% | 25% |" in table
    assert "is r32w4k64; it beats gemv from 16 sequences (the engine switches at 16)" in table
    assert "32 sequences: 12.8x the tokens/s of one" in table
