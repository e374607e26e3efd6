"""One archive that a GPU machine without TVM or relaxlm installed runs as one command.

    python scripts/gpu_payload.py build .gpu [--python 3.12] [--target cuda:sm_90]  # here
    python3 scripts/gpu_payload.py run .gpu.tar.gz                                 # there

A lent GPU machine has a short budget (minutes) and nothing to install from: `build` prepares
everything on the build machine, `run` spends the GPU's time on measurements only.

`build DIR` writes DIR/site, a runtime-only TVM (the `apache-tvm` package without its 259 MB
compiler library, headers and sources; `TVM_USE_RUNTIME_LIB=1` keeps TVM from looking for
them), what the runtime imports that the GPU machine lacks (CARRIED: tvm_ffi, pydantic) for
its Python (the installed packages, else the same versions' wheels from the package index)
and relaxlm's runtime as a package; DIR/check, scripts/gpu_check.py's artifacts and references
(each `--check` passes its options); DIR/bench/<n>, scripts/bench_gpu.py's weightless
artifacts (each `--bench`); DIR/sweep, scripts/gemm_sweep.py's libraries (`--sweep`: a decode
step's weight GEMMs through each schedule). A file that several artifacts hold is kept once
(duplicates.json). Then DIR.tar.gz, the one path to carry; it fails past `--max-mib` with the
working tree (the device carries 64 MiB).

`run` unpacks the archive (or takes the folder), puts its site/ first on the path, then runs
each step in its own process with its own time limit (all within `--budget`), its output in
$OUT (else DIR/out) as it comes: a probe (which TVM and relaxlm were imported, whether TVM's
compiler library was loaded, the device; the run stops there if it fails), gpu_check --run-only
(check.log), bench_gpu --run-only per bench folder (bench.log, bench-<n>.json), gemm_sweep
--run-only (sweep.log, sweep.json), profile_decode on `--profile`'s artifacts (profile.log;
after bench, which refills their weights). It exits 1 if a step failed, after running the
others.
`build --target cpu` then `run --device cpu` does the same on this machine
(tests/test_gpu_payload.py).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
# relaxlm's subpackages that the runtime needs, as pyproject.toml's package-dir maps them.
RUNTIME_PACKAGES = {
    "relaxlm": "relaxlm",
    "relaxlm/runtime": "runtime",
    "relaxlm/artifacts": "artifacts",
}
# What only building needs, left out of the payload's packages: TVM's 259 MB compiler library,
# headers and sources (TVM_USE_RUNTIME_LIB=1 keeps TVM from looking for them), tvm_ffi's too.
BUILD_ONLY = {
    "tvm": ("lib/libtvm_compiler.so", "3rdparty", "src", "web", "include"),
    "tvm_ffi": ("include", "3rdparty", "src", "cython"),
}
# What a first GPU run measures (issue 18's tables), sized for one call of the device.
# Distributions the runtime imports that the GPU machine's image lacks (its package list:
# /work/.library/device/KINDS.md): name -> its top-level packages. tvm_ffi is compiled per Python.
CARRIED = {
    "apache-tvm-ffi": ("tvm_ffi",),
    "pydantic": ("pydantic",),  # artifacts/schema.py, the manifest's schema
    "pydantic-core": ("pydantic_core",),
    "annotated-types": ("annotated_types",),
    "typing-inspection": ("typing_inspection",),
}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64")
PLATFORMS += ("manylinux_2_17_x86_64", "manylinux2014_x86_64")  # pip matches each exactly
DEFAULT_CHECKS = (
    "--cases llama,mistral,qwen3 --dtypes float16,bfloat16",
    "--cases llama,mistral,qwen3 --dtypes float16,bfloat16 --gemm library",
)
DEFAULT_BENCHES = (  # CUDA graphs for the small shape, whose step is launch-bound
    "--shapes llama-3.2-1b --gemm-library --cuda-graph",
    "--shapes llama-3-8b --gemm-library",
)
DEFAULT_PROFILE = "llama-3.2-1b-q4-float16,llama-3-8b-q4-float16"
DEFAULT_SWEEP = "--shape llama-3-8b"  # decode's weight GEMMs per schedule and batch
DUPLICATES = "duplicates.json"
STEP_SECONDS = {"probe": 60, "check": 120, "bench": 210, "sweep": 60, "profile": 45}


def build(
    folder: Path,
    python: str,
    target: str,
    checks: list[str],
    benches: list[str],
    sweep: str | None,
    max_mib: float,
) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    site = folder / "site"
    for stale in (site, folder / "check", folder / "bench", folder / "sweep", folder / "out"):
        shutil.rmtree(stale, ignore_errors=True)
    _copy_runtime_tvm(site)
    _copy_distributions(site, python)
    _copy_relaxlm_runtime(site)
    # Every --check compiles into DIR/check (variants get folders of their own); each --bench
    # into DIR/bench/<n>, which `run` measures as a step of its own (a step that runs out of
    # time loses its table, not the others').
    jobs = [("gpu_check.py", folder / "check", options) for options in checks]
    jobs += [("bench_gpu.py", folder / "bench" / str(n), opts) for n, opts in enumerate(benches)]
    jobs += [("gemm_sweep.py", folder / "sweep", sweep)] if sweep is not None else []
    for script, into, options in jobs:
        command = [sys.executable, str(SCRIPTS / script), "--compile-only", str(into)]
        command += ["--target", target, *shlex.split(options)]
        print(f"[build] {shlex.join(command[1:])}", file=sys.stderr, flush=True)
        if subprocess.run(command).returncode != 0:  # a case that fails is a row, not this
            raise SystemExit(f"{script} --compile-only failed; see above")
    shutil.rmtree(folder / "check" / "checkpoints", ignore_errors=True)  # the compile's input
    _dedupe(folder)
    archive = _pack(folder)
    mib = (archive.stat().st_size + _tracked_bytes()) / 2**20
    print(f"[build] {archive} and the working tree: {mib:.1f} MiB (the device carries 64)")
    if mib > max_mib:
        print(f"error: {mib:.1f} MiB is over --max-mib {max_mib:g}", file=sys.stderr)
        return 2
    shown = archive.relative_to(REPO) if archive.is_relative_to(REPO) else archive
    print(f"[build] on the GPU machine: python3 scripts/gpu_payload.py run {shown}")
    return 0


def _copy_runtime_tvm(site: Path) -> None:
    import tvm

    _copy_package(Path(tvm.__file__).parent, site / "tvm")


def _copy_distributions(site: Path, python: str) -> None:
    """CARRIED's packages, which must match the GPU machine's Python where they hold compiled
    code: the installed ones where that is this Python, else the installed versions' wheels for
    `python` from the package index."""
    if python == f"{sys.version_info.major}.{sys.version_info.minor}":
        for package in (p for packages in CARRIED.values() for p in packages):
            _copy_package(Path(importlib.util.find_spec(package).origin).parent, site / package)
        return
    from importlib.metadata import version

    with tempfile.TemporaryDirectory() as wheels:
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", wheels]
        command += ["--only-binary=:all:", "--python-version", python, "--implementation", "cp"]
        command += ["--abi", "cp" + python.replace(".", "")]
        command += [arg for platform in PLATFORMS for arg in ("--platform", platform)]
        command += [f"{name}=={version(name)}" for name in CARRIED]
        if subprocess.run(command).returncode != 0:
            raise SystemExit(f"{', '.join(CARRIED)}: no wheels for Python {python} (see above)")
        for wheel in Path(wheels).glob("*.whl"):
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(wheels)
        for package in (p for packages in CARRIED.values() for p in packages):
            _copy_package(Path(wheels) / package, site / package)


def _copy_relaxlm_runtime(site: Path) -> None:
    for package, source in RUNTIME_PACKAGES.items():
        _copy_package(REPO / source, site / package)


def _copy_package(source: Path, into: Path) -> None:
    """`source` without bytecode caches and without its BUILD_ONLY paths."""
    leave_out = BUILD_ONLY.get(into.name, ())

    def ignore(folder: str, names: list[str]) -> set[str]:
        relative = Path(folder).relative_to(source)
        return {
            name
            for name in names
            if name == "__pycache__" or name.endswith(".pyc") or str(relative / name) in leave_out
        }

    shutil.copytree(source, into, ignore=ignore, dirs_exist_ok=True)


def _dedupe(folder: Path) -> None:
    """Keep one copy of each file that several artifacts hold (a `--gemm library` variant has
    its case's weights): DUPLICATES maps each removed file to the one kept; `run` copies them
    back (and the manifests' checksums check them when they load)."""
    kept, removed = {}, {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
        if path.stat().st_size < 2**16 or path.is_relative_to(folder / "site"):
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        relative = str(path.relative_to(folder))
        if digest in kept:
            removed[relative] = kept[digest]
            path.unlink()
        else:
            kept[digest] = relative
    (folder / DUPLICATES).write_text(json.dumps(removed, indent=1))


def _restore(folder: Path) -> None:
    for copy, original in json.loads((folder / DUPLICATES).read_text()).items():
        if not (folder / copy).exists():
            shutil.copyfile(folder / original, folder / copy)


def _pack(folder: Path) -> Path:
    """DIR.tar.gz beside DIR (a third of its size: the CUDA libraries compress well), written
    whole or not at all."""
    archive = folder.with_name(folder.name + ".tar.gz")
    partial = archive.with_name(archive.name + ".partial")
    with tarfile.open(partial, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    partial.replace(archive)
    return archive


def _unpack(archive: Path, into: Path | None) -> Path:
    into = into or Path(tempfile.mkdtemp(prefix="relaxlm-gpu-"))
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    (folder,) = into.iterdir()
    return folder


def _tracked_bytes() -> int:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True)
    files = [REPO / name.decode() for name in listed.stdout.split(b"\0") if name]
    return sum(path.stat().st_size for path in files if path.is_file())


PROBE = """
import json, sys
sys.path.insert(0, sys.argv[2])
from gpu_check import load_runtime_plugins
import tvm, relaxlm, relaxlm.runtime, pydantic
load_runtime_plugins(sys.argv[1].split(':')[0])
maps = open('/proc/self/maps').read()
device = tvm.runtime.device(sys.argv[1])
print(json.dumps({
    'python': sys.version.split()[0], 'tvm': tvm.__file__,
    'relaxlm': relaxlm.__file__, 'relaxlm.runtime': relaxlm.runtime.__file__,
    'pydantic': pydantic.__file__,
    'tvm_compiler_loaded': 'libtvm_compiler.so' in maps, 'device': sys.argv[1],
    'device_exists': bool(device.exist),
    'device_name': device.device_name if device.exist and sys.argv[1] != 'cpu' else None,
}))
sys.exit(0 if device.exist else 1)
"""


def run(
    folder: Path,
    device: str,
    out: Path,
    profile: list[str],
    bench_options: str,
    sweep_options: str,
    budget: float,
) -> int:
    out.mkdir(parents=True, exist_ok=True)
    _restore(folder)
    env = dict(os.environ, PYTHONPATH=str(folder / "site"), TVM_USE_RUNTIME_LIB="1")
    env["PYTHONUNBUFFERED"] = "1"
    steps = [("probe", ["-c", PROBE, device, str(SCRIPTS)], "probe.json")]
    if (folder / "check").is_dir():
        command = [str(SCRIPTS / "gpu_check.py"), "--run-only", str(folder / "check")]
        steps.append(("check", [*command, "--device", device], "check.log"))
    benches = sorted((folder / "bench").iterdir()) if (folder / "bench").is_dir() else []
    for bench in benches:
        command = [str(SCRIPTS / "bench_gpu.py"), "--run-only", str(bench), "--device", device]
        command += shlex.split(bench_options)
        steps.append(
            ("bench", [*command, "--json", str(out / f"bench-{bench.name}.json")], "bench.log")
        )
    if (folder / "sweep").is_dir():
        command = [str(SCRIPTS / "gemm_sweep.py"), "--run-only", str(folder / "sweep")]
        command += ["--device", device, "--json", str(out / "sweep.json")]
        steps.append(("sweep", [*command, *shlex.split(sweep_options)], "sweep.log"))
    for bench in benches:  # after bench, which refilled their weights
        for name in profile:
            if (bench / name / "artifact").is_dir():
                command = [str(SCRIPTS / "profile_decode.py"), str(bench / name / "artifact")]
                steps.append(("profile", [*command, "--device", device], "profile.log"))
    deadline = time.monotonic() + budget
    failed = []
    for name, command, log in steps:
        seconds = min(STEP_SECONDS[name], deadline - time.monotonic())
        if seconds < 10:
            failed.append(f"{name} (no time left)")
            continue
        # In the payload's folder: from the repository's root `-c` would import relaxlm/ there
        if not _step(name, [sys.executable, *command], env, out / log, seconds, folder):
            failed.append(name)
            if name == "probe":
                break  # no TVM or no device: every other step would fail the same way
    print(
        f"[run] {'failed: ' + ', '.join(failed) if failed else 'all steps passed'}; logs in {out}"
    )
    return 1 if failed else 0


def _step(name: str, command: list[str], env: dict, log: Path, seconds: float, cwd: Path) -> bool:
    """Run one step with its output going to `log` as it comes (a run cut off from outside
    still leaves it), then echo its end; False if it failed or ran out of `seconds`."""
    shown = "the probe" if command[1] == "-c" else shlex.join(command[1:])
    print(f"[run] {name}: {shown} (limit {seconds:.0f} s)", flush=True)
    start, size = time.perf_counter(), log.stat().st_size if log.exists() else 0
    with open(log, "a") as f:
        try:
            code = subprocess.run(
                command, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=seconds, cwd=cwd
            ).returncode
            status = f"exit {code}"
        except subprocess.TimeoutExpired:
            code, status = None, "ran out of time"
    with open(log, errors="replace") as f:
        f.seek(size)
        print(f.read()[-6000:], flush=True)
    print(f"[run] {name}: {status} after {time.perf_counter() - start:.0f} s", flush=True)
    return code == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    b = commands.add_parser("build", help="on the build machine")
    b.add_argument("folder", type=Path)
    b.add_argument("--python", default="3.12", help="the GPU machine's Python (major.minor)")
    b.add_argument("--target", default="cuda:sm_90")
    b.add_argument("--check", action="append", help="gpu_check.py --compile-only options")
    b.add_argument("--bench", action="append", help="bench_gpu.py --compile-only options")
    b.add_argument("--sweep", default=DEFAULT_SWEEP, help="gemm_sweep.py --compile-only options")
    b.add_argument("--no-check", action="store_true")
    b.add_argument("--no-bench", action="store_true")
    b.add_argument("--no-sweep", action="store_true")
    b.add_argument("--max-mib", type=float, default=60.0)
    r = commands.add_parser("run", help="on the GPU machine")
    r.add_argument("folder", type=Path, help="the folder, or the archive `build` wrote")
    r.add_argument("--device", default="cuda")
    r.add_argument("--unpack-to", type=Path, help="where an archive goes (default: a new temp)")
    r.add_argument("--profile", default=DEFAULT_PROFILE, help="bench artifacts to profile")
    r.add_argument("--bench", default="", help="more bench_gpu.py --run-only options")
    r.add_argument("--sweep", default="", help="more gemm_sweep.py --run-only options")
    r.add_argument("--budget", type=float, default=570, help="seconds for all steps together")
    args = parser.parse_args(argv)
    if args.command == "build":
        checks = [] if args.no_check else args.check or list(DEFAULT_CHECKS)
        benches = [] if args.no_bench else args.bench or list(DEFAULT_BENCHES)
        sweep = None if args.no_sweep else args.sweep
        return build(args.folder, args.python, args.target, checks, benches, sweep, args.max_mib)
    if args.folder.is_file():
        folder = _unpack(args.folder, args.unpack_to)
    else:
        folder = args.folder.resolve()
    out = Path(os.environ.get("OUT") or folder / "out")
    profile = [p for p in args.profile.split(",") if p]
    return run(folder, args.device, out, profile, args.bench, args.sweep, args.budget)


if __name__ == "__main__":
    sys.exit(main())
