"""A CPU library records the SIMD extensions it was compiled for (artifacts/cpu_features.py),
and a CPU without one of them is refused with one error at load, not killed by SIGILL in the
first forward."""

import pytest
from tvm.target import codegen

from relaxlm.artifacts import Manifest, cpu_features
from relaxlm.compiler.targets import resolve_target
from relaxlm.errors import RelaxlmError
from relaxlm.runtime.model import CompiledModel

# /proc/cpuinfo flags of a Haswell (AVX2, no AVX-512), as Linux prints them
HASWELL = set(
    "fpu sse sse2 ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt aes xsave avx f16c rdrand "
    "bmi1 avx2 bmi2 erms invpcid".split()
)


def test_a_library_names_what_llvms_cpu_model_has():
    def recorded(target):
        return resolve_target(target).extra_manifest["cpu_features"]

    assert recorded("cpu:haswell") == ["sse4.1", "sse4.2", "avx", "avx2", "fma", "f16c"]
    skylake = recorded("cpu:skylake-avx512")
    assert {"avx512f", "avx512bw", "avx512vl"} <= set(skylake) and "avx512vnni" not in skylake
    assert "avxvnni" in recorded("cpu:alderlake") and "avx512f" not in recorded("cpu:alderlake")
    # Every recorded name is one LLVM enables for that CPU.
    target = resolve_target("cpu:icelake-server")
    enabled = set(codegen.llvm_get_cpu_features(target.target()))
    assert set(target.extra_manifest["cpu_features"]) <= enabled
    # This machine's own library always loads on it.
    assert cpu_features.missing(recorded("cpu"), cpu_features.host_flags()) == []


def test_missing_reads_cpuinfo_names(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nflags\t\t: " + " ".join(sorted(HASWELL)) + "\n\nprocessor\t: 1\n"
    )
    assert cpu_features.host_flags(cpuinfo) == HASWELL
    assert cpu_features.host_flags(tmp_path / "absent") is None
    wanted = ["avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vnni", "avxvnni"]
    assert cpu_features.missing(wanted, HASWELL) == [
        "avx512f",
        "avx512bw",
        "avx512vnni",
        "avxvnni",
    ]
    assert cpu_features.missing(wanted, HASWELL | {"avx512f", "avx512bw", "avx512_vnni"}) == [
        "avxvnni"
    ]
    assert cpu_features.missing(["avx512f", "not-simd"], None) == []  # nothing to compare with
    assert cpu_features.missing(["not-simd"], HASWELL) == []  # only the table's extensions


def test_an_avx512_artifact_is_refused_on_an_avx2_cpu(compiled, monkeypatch):
    folder = compiled("llama_gqa").artifact
    required = Manifest.read(folder).targets["cpu"]["cpu_features"]
    assert "avx2" in required
    CompiledModel(folder)  # loads here
    monkeypatch.setattr(cpu_features, "host_flags", lambda: HASWELL)
    lacking = [f for f in required if cpu_features.CPUINFO_FLAGS[f] not in HASWELL]
    if not lacking:  # built on an AVX2 machine: nothing in it needs more than a Haswell
        CompiledModel(folder)
        return
    with pytest.raises(RelaxlmError, match=f"uses {', '.join(lacking)}, which this CPU lacks"):
        CompiledModel(folder)
