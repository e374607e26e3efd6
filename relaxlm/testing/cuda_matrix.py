"""The CUDA compile matrix: every GPU case x dtype x quantization built for `cuda:sm_80,sm_90`
on a machine without a GPU, in child processes, so a compiler segfault fails one cell instead of
the caller.

Each cell is built once: TVM's codegen to CUDA source for every cell (the part that crashed on
the H200), nvcc to a fatbin for one cell per case (`nvcc_cell`). A child builds the cells of one
case in order (the KV-cache kernels are shared by its quantizations, see
`lower_attention_to_paged_kv`), its nvcc cell last (TVM's CUDA plugin, once loaded, compiles
every later build). If a child dies, the cell it was building is reported crashed and a new
child goes on with the rest.

    results = run_cells(matrix_cells(), folder, workers=2)   # cell id -> result dict
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from .gpu_cases import (
    CUDA_TARGET,
    DIFFUSION_CASES,
    DIFFUSION_CELLS,
    DIFFUSION_NVCC_CELL,
    DTYPES,
    GGUF_CASES,
    GPU_CASES,
    KV_CACHE_CELLS,
    QUANTS,
    VISION_CASES,
    VISION_CELLS,
)


@dataclass(frozen=True)
class Cell:
    case: str
    dtype: str
    quant: str
    nvcc: bool = False  # device code compiled by nvcc (else CUDA source only)
    kv_cache: str = "auto"  # --kv-cache-dtype

    @property
    def id(self) -> str:
        kv = "" if self.kv_cache == "auto" else f"-kv_{self.kv_cache}"
        return f"{self.case}-{self.dtype}-{self.quant}{kv}"


def nvcc_cell(case: str) -> tuple[str, str]:
    """The (dtype, quant) of `case` that nvcc compiles: the first twelve GPU cases take the
    twelve pairs, so every architecture, dtype and quantization reaches nvcc at least once."""
    i = list(GPU_CASES).index(case)
    return DTYPES[i % len(DTYPES)], QUANTS[i // len(DTYPES) % len(QUANTS)]


def matrix_cells(nvcc: bool = True, full: bool = True) -> list[Cell]:
    """Every GPU case x dtype x quant, then the GGUF cases x dtype (their own blocks), the
    vision cases' cells and the quantized-KV-cache cells (CUDA source only) and the diffusion
    pipelines' cells.

    full=False: the covering set the test suite builds, a third of the cells: every case in
    every dtype, its quantizations rotating (each case meets three of the four, every
    dtype x quant pair is met, and each case's nvcc cell is among them); one dtype of each
    GGUF case, one cell of each vision case, and each diffusion case's nvcc cell plus one more.
    """
    cells = [
        Cell(case, dtype, quant, nvcc and (dtype, quant) == nvcc_cell(case))
        for i, case in enumerate(GPU_CASES)
        for j, dtype in enumerate(DTYPES)
        for quant in (QUANTS if full else [_rotated_quant(i, j)])
    ]
    cells += [
        Cell(case, dtype, "none")
        for i, case in enumerate(GGUF_CASES)
        for dtype in _all_or_one(DTYPES, i, full)
    ]
    cells += [
        Cell(case, d, q)
        for i, case in enumerate(VISION_CASES)
        for d, q in _all_or_one(VISION_CELLS, i, full)
    ]
    cells += [Cell(case, d, q, kv_cache=kv) for case, d, q, kv in KV_CACHE_CELLS]
    others = [c for c in DIFFUSION_CELLS if c != DIFFUSION_NVCC_CELL]
    return cells + [
        Cell(case, d, q, nvcc and (d, q) == DIFFUSION_NVCC_CELL)
        for i, case in enumerate(DIFFUSION_CASES)
        for d, q in (DIFFUSION_CELLS if full else [DIFFUSION_NVCC_CELL, *_all_or_one(others, i)])
    ]


def _all_or_one(options, case_index: int, full: bool = False) -> list:
    """All of `options`, or (full=False) the one a case takes in the covering set: case i the
    i-th, round the options."""
    return list(options) if full else [options[case_index % len(options)]]


def _rotated_quant(case_index: int, dtype_index: int) -> str:
    """The quantization of a case's dtype in the covering set: shifted by one per dtype from
    the case's nvcc pair, so the case's nvcc cell is in the set."""
    offset = case_index // len(DTYPES) + dtype_index - case_index % len(DTYPES)
    return QUANTS[offset % len(QUANTS)]


def run_cells(
    cells: list[Cell], folder: str | Path, workers: int = 2, timeout: float = 900
) -> dict[str, dict]:
    """Build `cells` in child processes (one per case at a time, `workers` at once).

    Returns cell id -> {"ok": True, "kernels": [...], "seconds": s, ["sass": {...}]} or
    {"ok": False, "error": type name, "message": text} (a crash: error "crash", the exit code
    and the end of its stderr).
    """
    by_case: dict[str, list[Cell]] = {}
    for cell in cells:
        by_case.setdefault(cell.case, []).append(cell)
    groups = [sorted(group, key=lambda c: c.nvcc) for group in by_case.values()]
    groups.sort(key=lambda g: -len(g))  # the long ones first
    results: dict[str, dict] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for part in pool.map(lambda g: _run_group(g, Path(folder), timeout), groups):
            results.update(part)
    return results


def _run_group(cells: list[Cell], folder: Path, timeout: float) -> dict[str, dict]:
    results: dict[str, dict] = {}
    while len(results) < len(cells):
        todo = [c for c in cells if c.id not in results]
        payload = json.dumps({"folder": str(folder), "cells": [asdict(c) for c in todo]})
        try:
            proc = subprocess.run(
                [sys.executable, "-m", __name__],
                input=payload,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            stdout, stderr, code = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            stdout, stderr, code = e.stdout or "", f"timed out after {timeout} s", "timeout"
            stdout = stdout.decode() if isinstance(stdout, bytes) else stdout
        started = None
        for line in stdout.splitlines():
            if not line.startswith("{"):
                continue
            record = json.loads(line)
            if "start" in record:
                started = record["start"]
            else:
                results[record.pop("cell")] = record
                started = None
        if len(results) < len(cells):  # the child died: in a cell, or before the first one
            crashed = started or todo[0].id
            stderr = stderr if isinstance(stderr, str) else stderr.decode(errors="replace")
            results[crashed] = {
                "ok": False,
                "error": "crash",
                "message": f"the compiling process ended with {code}: {stderr[-3000:]}",
            }
    return results


# -- the child ---------------------------------------------------------------------------------


def _build_cell(cell: Cell, exported) -> dict:
    from relaxlm.compiler import pipeline
    from relaxlm.compiler.quantization import resolve_scheme
    from relaxlm.compiler.targets import resolve_target

    preset = resolve_target(CUDA_TARGET)
    scheme = resolve_scheme(cell.quant)
    start = time.perf_counter()
    executable, _, _ = pipeline.build_library(
        exported, preset, scheme, device_binaries=cell.nvcc, kv_cache_dtype=cell.kv_cache
    )
    result = {"ok": True}
    (host,) = executable.mod.imports
    (device,) = host.imports
    result["device_module"] = device.kind
    if cell.nvcc:
        with tempfile.TemporaryDirectory() as scratch:
            library = Path(scratch) / "cuda.so"
            executable.export_library(str(library))
            result["fatbin"] = fatbin_summary(library.read_bytes())
    else:
        source = device.inspect_source("")
        result["kernels"] = sorted(_cuda_kernels(source))
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def _build_diffusion_cell(cell: Cell, checkpoint: Path, out: Path) -> dict:
    """Every component of a diffusers pipeline: entry name -> its kernels (CUDA source) or
    its fatbin summary (nvcc)."""
    from relaxlm.compiler.diffusion import compile_diffusion

    from .tiny_diffusion import FLUX_SIZE, FLUX_T5_LENGTH, SD_SIZE

    size = FLUX_SIZE if cell.case == "flux" else SD_SIZE
    start = time.perf_counter()
    folder = compile_diffusion(
        checkpoint,
        out / cell.id,
        target=CUDA_TARGET,
        height=size,
        width=size,
        dtype=cell.dtype,
        quant=cell.quant,
        progress=False,
        device_binaries=cell.nvcc,
        max_sequence_length=FLUX_T5_LENGTH,
    )
    manifest = json.loads((folder / "manifest.json").read_text())
    entries = {}
    for name, entry in manifest["entries"].items():
        library = (folder / entry["library"]).read_bytes()
        # TVM stores CUDA source in the library as text when nvcc does not run.
        entries[name] = (
            fatbin_summary(library)
            if cell.nvcc
            else sorted(_cuda_kernels(library.decode("latin-1")))
        )
    return {
        "ok": True,
        "device_module": manifest["device"],
        "entries": entries,
        "seconds": round(time.perf_counter() - start, 2),
    }


def _cuda_kernels(source: str) -> set[str]:
    """Names of the `__global__` functions in TVM's CUDA source."""
    return set(cuda_kernel_sources(source))


def cuda_kernel_sources(source: str) -> dict[str, str]:
    """Each `__global__` function of TVM's CUDA source: name -> its text, up to the next one."""
    found = list(_KERNEL.finditer(source))
    ends = [m.start() for m in found[1:]] + [len(source)]
    return {m.group(1): source[m.start() : end] for m, end in zip(found, ends, strict=True)}


_KERNEL = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\(\d+\)\s+)?(\w+)\s*\(")


FATBIN_MAGIC = 0xBA55ED50
PTX, ELF = 1, 2  # fatbin entry kinds


def fatbins(data: bytes) -> list[list[tuple[int, int, bytes]]]:
    """Every fatbin in `data` (a library): its entries as (kind, sm arch, payload).

    Layout (as cuobjdump reads it): header {u32 magic, u16 version, u16 header size, u64 size};
    entries {u16 kind, u16 version, u32 header size, u64 payload size, ..., u32 arch at 28}.
    """
    import struct

    found = []
    start = data.find(struct.pack("<I", FATBIN_MAGIC))
    while start >= 0:
        _, _, header, size = struct.unpack_from("<IHHQ", data, start)
        pos, end, entries = start + header, start + header + size, []
        while pos < end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, pos)
            arch = struct.unpack_from("<I", data, pos + 28)[0]
            entries.append((kind, arch, data[pos + entry_header : pos + entry_header + payload]))
            pos += entry_header + payload
        found.append(entries)
        start = data.find(struct.pack("<I", FATBIN_MAGIC), end)
    return found


def elf_kernels(elf: bytes) -> set[str]:
    """Kernel names of a cubin: its `.text.<kernel>` sections."""
    import struct

    assert elf[:4] == b"\x7fELF", "SASS entry is not an ELF cubin"
    shoff = struct.unpack_from("<Q", elf, 0x28)[0]
    entsize, count, names_index = struct.unpack_from("<HHH", elf, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", elf, shoff + i * entsize) for i in range(count)]
    strtab = headers[names_index][4]  # sh_offset of the section-name table
    names = [elf[strtab + h[0] : elf.index(b"\0", strtab + h[0])].decode() for h in headers]
    return {n.removeprefix(".text.") for n in names if n.startswith(".text.")}


def fatbin_summary(library: bytes) -> dict:
    """{"sass": {arch: sorted kernel names}, "ptx": [archs]} of a CUDA library's fatbins."""
    entries = [e for fatbin in fatbins(library) for e in fatbin]
    sass = {str(arch): sorted(elf_kernels(body)) for kind, arch, body in entries if kind == ELF}
    return {"sass": sass, "ptx": [arch for kind, arch, _ in entries if kind == PTX]}


def _child() -> None:
    from relaxlm.errors import RelaxlmError
    from relaxlm.frontends import export, load_checkpoint

    from .gpu_cases import make_case

    job = json.loads(sys.stdin.read())
    folder = Path(job["folder"])
    exported, checkpoints = {}, {}
    for fields in job["cells"]:
        cell = Cell(**fields)
        print(json.dumps({"start": cell.id}), flush=True)
        if cell.case not in checkpoints:
            checkpoints[cell.case] = make_case(folder / cell.case, cell.case)
        key = (cell.case, cell.dtype)
        try:
            if cell.case in DIFFUSION_CASES:
                result = _build_diffusion_cell(cell, checkpoints[cell.case], folder)
            else:
                if key not in exported:
                    exported[key] = export(load_checkpoint(checkpoints[cell.case]), cell.dtype)
                result = _build_cell(cell, exported[key])
        except RelaxlmError as e:
            result = {"ok": False, "error": "RelaxlmError", "message": str(e)}
        except Exception as e:  # reported as the cell's failure, with its type
            result = {"ok": False, "error": type(e).__name__, "message": str(e)[-3000:]}
        print(json.dumps({"cell": cell.id, **result}), flush=True)


if __name__ == "__main__":
    _child()
