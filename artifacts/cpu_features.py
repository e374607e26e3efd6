"""The x86 instruction-set extensions a CPU library was compiled to use, and whether this CPU has
them: an artifact built for an AVX-512 machine dies with SIGILL on an AVX2 one, with no word
of why, unless its loader checks first.

The compiler records, per CPU library, the extensions of its LLVM target that vectorized code
can use (the manifest's `cpu_features`, LLVM's names); the runtime compares them with the
flags Linux reports in /proc/cpuinfo (elsewhere nothing is checked). Only these SIMD
extensions are recorded: LLVM's CPU models also name system features (tsxldtrk, uintr,
avx512vp2intersect, ...) that hypervisors hide and compiled kernels never use.
"""

from pathlib import Path

# LLVM feature -> the /proc/cpuinfo flag of the same extension
CPUINFO_FLAGS = {
    "sse4.1": "sse4_1",
    "sse4.2": "sse4_2",
    "avx": "avx",
    "avx2": "avx2",
    "fma": "fma",
    "f16c": "f16c",
    "avx512f": "avx512f",
    "avx512bw": "avx512bw",
    "avx512dq": "avx512dq",
    "avx512vl": "avx512vl",
    "avx512cd": "avx512cd",
    "avx512vnni": "avx512_vnni",
    "avxvnni": "avx_vnni",
    "avx512bf16": "avx512_bf16",
    "avx512fp16": "avx512_fp16",
    "avx512vbmi": "avx512vbmi",
    "avx512ifma": "avx512ifma",
    "amx-tile": "amx_tile",
    "amx-int8": "amx_int8",
    "amx-bf16": "amx_bf16",
}


def host_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """This CPU's flags (its first processor's), or None where the system does not say."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return None


def missing(required: list[str], flags: set[str] | None) -> list[str]:
    """The extensions of `required` (LLVM names) that a CPU with `flags` lacks; none when the
    flags are unknown."""
    if flags is None:
        return []
    return [f for f in required if f in CPUINFO_FLAGS and CPUINFO_FLAGS[f] not in flags]
