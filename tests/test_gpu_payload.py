"""scripts/gpu_payload.py on the CPU: `build` makes the folder a GPU machine runs (a runtime-only
TVM, relaxlm's runtime, gpu_check's and bench_gpu's artifacts, gemm_sweep's libraries), `run`
runs every step there from that folder alone, in processes whose TVM is the payload's and never
loads the compiler."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "scripts" / "gpu_payload.py"


@pytest.fixture(scope="module")
def payload(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("payload") / "gpu"
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    command = [sys.executable, str(SCRIPT), "build", str(folder), "--python", python]
    command += ["--target", "cpu", "--check", "--cases llama --dtypes float32"]
    command += ["--check", "--cases llama --dtypes float32 --gemm library"]
    command += ["--bench", "--shapes tiny --formats q4-float32", "--sweep", "--shape tiny"]
    built = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, built.stderr[-3000:]
    assert "MiB (the device carries 64)" in built.stdout
    assert built.stdout.splitlines()[-1].endswith(f"gpu_payload.py run {folder}.tar.gz")
    return folder


def _run(payload: Path, out: Path, *options: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPT), "run", str(payload), *options]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OUT": str(out)}
    return subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)


def test_the_payload_holds_what_the_runtime_needs_and_no_compiler(payload):
    site = payload / "site"
    assert (site / "tvm" / "lib" / "libtvm_runtime.so").is_file()
    assert (site / "tvm" / "lib" / "libtvm_runtime_cuda.so").is_file()
    assert not (site / "tvm" / "lib" / "libtvm_compiler.so").exists()
    assert not (site / "tvm_ffi" / "include").exists()
    assert list((site / "tvm_ffi").glob("core.cpython-*.so"))
    assert (site / "relaxlm" / "runtime" / "engine.py").is_file()
    assert (site / "relaxlm" / "artifacts" / "schema.py").is_file()
    assert not (site / "relaxlm" / "compiler").exists()
    for package in ("pydantic", "pydantic_core", "annotated_types", "typing_inspection"):
        assert (site / package / "__init__.py").is_file()  # not in the GPU machine's image
    assert not (payload / "check" / "checkpoints").exists()  # the compile's input only
    assert (payload / "check" / "llama-float32" / "reference.json").is_file()
    # the library variant's weights are the case's: kept once, copied back by `run`
    shard = "check/llama-float32-library/artifact/weights/shard-000.safetensors"
    duplicates = json.loads((payload / "duplicates.json").read_text())
    assert duplicates[shard] == "check/llama-float32/artifact/weights/shard-000.safetensors"
    assert not (payload / shard).exists()
    assert (payload / "bench" / "0" / "tiny-q4-float32" / "artifact" / "hollow.json").is_file()


def test_run_measures_from_the_archive_alone(payload, tmp_path):
    """From the archive (unpacked to a temporary folder), as on the GPU machine."""
    archive = payload.with_name("gpu.tar.gz")
    run = _run(
        archive,
        tmp_path,
        "--unpack-to",
        str(tmp_path / "unpacked"),
        "--device",
        "cpu",
        "--profile",
        "tiny-q4-float32",
        "--bench",
        "--prompts 16,64 --batch 4 --steps 4 --repeats 1",
        "--sweep",
        "--batches 1,3 --repeats 1",
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.splitlines()[-1].startswith("[run] all steps passed")
    probe = json.loads((tmp_path / "probe.json").read_text())
    for module in ("tvm", "relaxlm", "relaxlm.runtime", "pydantic"):
        site = Path(probe[module]).parents[len(module.split("."))]
        assert site.name == "site" and site.parent.name == "gpu", (module, probe[module])
        assert site.is_relative_to(tmp_path / "unpacked"), "the archive's, not the folder built"
    assert probe["tvm_compiler_loaded"] is False and probe["device_exists"] is True
    check = (tmp_path / "check.log").read_text().splitlines()
    rows = [line.split()[:2] + line.split()[-1:] for line in check if line.startswith("llama")]
    assert rows == [["llama", "float32", "ok"], ["llama-library", "float32", "ok"]]
    rows = json.loads((tmp_path / "bench-0.json").read_text())["rows"]
    assert [(r["engine"], "error" in r) for r in rows] == [
        ("relaxlm", False),
        ("transformers", False),
    ]
    assert rows[0]["decode_b1"] > 0
    sweep = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert {(r["quant"], r["batch"]) for r in sweep} == {
        (q, b) for q in ("q4", "none") for b in (1, 3)
    }
    assert "decode step:" in (tmp_path / "profile.log").read_text()


def test_run_stops_at_the_probe_without_the_device(payload, tmp_path):
    """No CUDA here: the probe fails (TVM's CUDA plugin cannot load without a driver), and no
    other step spends the device's time."""
    run = _run(payload, tmp_path, "--device", "cuda")
    assert run.returncode == 1
    assert "[run] failed: probe;" in run.stdout
    assert not (tmp_path / "check.log").exists() and not (tmp_path / "bench.log").exists()
