"""scripts/gpu_check.py's two halves on the CPU, so the GPU check cannot rot: --compile-only
writes artifacts and transformers' references, --run-only checks them in a process that never
imports the compiler, the frontends or transformers (as on a GPU machine with a runtime-only
TVM; torch is not needed there, though TVM 0.27 imports it when it is installed)."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "scripts" / "gpu_check.py"

# Runs the script's --run-only, then reports which heavy modules the process imported.
RUN_ONLY = (
    "import runpy, sys\n"
    "sys.argv = [sys.argv[1], '--run-only', sys.argv[2], '--device', 'cpu']\n"
    "try:\n"
    "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
    "except SystemExit as e:\n"
    "    code = e.code\n"
    "heavy = ('transformers', 'relaxlm.compiler', 'relaxlm.testing', 'relaxlm.frontends')\n"
    "print('imported:', ','.join(m for m in heavy if m in sys.modules) or 'none')\n"
    "sys.exit(code)\n"
)


def test_compile_only_then_run_only_on_the_cpu(tmp_path):
    folder = tmp_path / "check"
    compile_cmd = [sys.executable, str(SCRIPT), "--compile-only", str(folder), "--target", "cpu"]
    compile_cmd += ["--cases", "qwen3,gpt2", "--dtypes", "float32,float16"]
    compiled = subprocess.run(compile_cmd, capture_output=True, text=True, timeout=900)
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    assert sorted(p.name for p in folder.iterdir() if (p / "reference.json").is_file()) == [
        "gpt2-float16",
        "gpt2-float32",
        "qwen3-float16",
        "qwen3-float32",
    ]

    run = subprocess.run(
        [sys.executable, "-c", RUN_ONLY, str(SCRIPT), str(folder)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert lines[0].startswith("relaxlm vs transformers on cpu")
    rows = [line.split() for line in lines[3:7]]
    assert [(r[0], r[1]) for r in rows] == [
        ("gpt2", "float16"),
        ("gpt2", "float32"),
        ("qwen3", "float16"),
        ("qwen3", "float32"),
    ]
    for row in rows:
        assert row[-1] == "ok", lines
        # batch = alone; no decode_batched in a CPU build (tests/test_batched_decode.py); seed
        assert row[-4:-1] == ["yes", "-", "yes"], lines
    assert rows[1][5] == "16/16" and rows[3][5] == "16/16"  # float32 greedy equal
    assert lines[-1] == "imported: none"


def test_run_only_fails_on_a_wrong_answer(tmp_path):
    """A reference that disagrees makes the row FAIL and the exit code 1."""
    import json

    folder = tmp_path / "check"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--compile-only", str(folder), "--target", "cpu"]
        + ["--cases", "gpt2", "--dtypes", "float32"],
        check=True,
        capture_output=True,
        timeout=900,
    )
    ref_file = folder / "gpt2-float32" / "reference.json"
    ref = json.loads(ref_file.read_text())
    ref["logits"][2][5] += 1.0  # one decode logit off
    ref_file.write_text(json.dumps(ref))
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--run-only", str(folder), "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 1
    assert run.stdout.splitlines()[3].split()[-1] == "FAIL"
