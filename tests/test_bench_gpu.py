"""scripts/bench_gpu.py's two halves on the CPU, so the GPU benchmark cannot rot: --compile-only
builds a tiny shape with its weights as holes (shards travel as headers), --run-only refills
them and measures relaxlm and transformers in a process that never imports the compiler. The
numbers are checked for being there, finite and positive, never for speed."""

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "scripts" / "bench_gpu.py"

RUN_ONLY = (
    "import runpy, sys\n"
    "sys.argv = [sys.argv[1], '--run-only', *sys.argv[2:]]\n"
    "try:\n"
    "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
    "except SystemExit as e:\n"
    "    code = e.code\n"
    "heavy = ('relaxlm.compiler', 'relaxlm.frontends', 'relaxlm.testing')\n"
    "print('imported:', ','.join(m for m in heavy if m in sys.modules) or 'none')\n"
    "sys.exit(code)\n"
)


def test_compile_only_then_run_only_on_the_cpu(tmp_path):
    from relaxlm.artifacts import Manifest, verify

    folder = tmp_path / "bench"
    compile_cmd = [sys.executable, str(SCRIPT), "--compile-only", str(folder), "--target", "cpu"]
    compile_cmd += ["--shapes", "tiny", "--formats", "q4-float32", "--gemm-library"]
    compiled = subprocess.run(compile_cmd, capture_output=True, text=True, timeout=900)
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    case = folder / "tiny-q4-float32"
    assert not (case / "error.txt").exists(), (case / "error.txt").read_text()
    artifact = case / "artifact"
    sizes = json.loads((artifact / "hollow.json").read_text())
    for name, size in sizes.items():  # each shard travels as its header only
        assert (artifact / "weights" / name).stat().st_size < size
    assert sorted(p.name for p in (folder / "tiny").iterdir()) == [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]  # no checkpoint weights travel

    out = tmp_path / "bench.json"
    run_args = [str(folder), "--device", "cpu", "--prompts", "16,64", "--batch", "4"]
    run_args += ["--steps", "4", "--repeats", "1", "--json", str(out)]
    run = subprocess.run(
        [sys.executable, "-c", RUN_ONLY, str(SCRIPT), *run_args],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert lines[0].startswith("relaxlm vs transformers (float16, eager) on cpu")
    assert lines[1].split()[:7] == ["engine", "shape", "format", "graph", "gemm", "dec", "b1"]
    assert [line.split()[:5] for line in lines[3:6]] == [
        ["relaxlm", "tiny", "q4-float32", "no", "tir"],
        ["relaxlm", "tiny", "q4-float32", "no", "library"],  # prefill in numpy's BLAS here
        ["transformers", "tiny", "float16", "no", "torch"],
    ]
    assert lines[-1] == "imported: none"
    verify(artifact, Manifest.read(artifact))  # refilled: the compiled bytes, checksums hold

    result = json.loads(out.read_text())
    assert math.isfinite(result["copy_bandwidth_gbs"]) and result["copy_bandwidth_gbs"] > 0
    ours, library, theirs = result["rows"]
    measured = ["decode_b1", "decode_b4", "prefill_16", "prefill_64", "ttft_16_ms"]
    measured += ["ttft_64_ms", "weight_bytes", "roofline"]
    for row in (ours, library, theirs):
        assert "error" not in row, row
        for key in measured:
            assert math.isfinite(row[key]) and row[key] > 0, (row["engine"], key, row[key])
    assert math.isfinite(ours["vm_step_ms"]) and ours["vm_step_ms"] > 0
    assert math.isfinite(ours["host_ms"])  # engine per token minus the VM step: may be ~0
    assert theirs["vm_step_ms"] is None and theirs["host_ms"] is None

    # scripts/profile_decode.py on the same artifact, its device synchronized around each call
    profile = subprocess.run(
        [sys.executable, str(SCRIPT.parent / "profile_decode.py"), str(artifact)]
        + ["--device", "cpu", "--steps", "2", "--prompt", "8"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert profile.returncode == 0, profile.stderr[-3000:]
    report = profile.stdout.splitlines()
    assert report[0].startswith("decode step: ") and report[2].split() == [
        "call",
        "calls",
        "us/step",
        "share",
    ]
    assert any(line.startswith("vm.builtin.attention_kv_cache") for line in report[3:])
