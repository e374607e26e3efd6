"""The CLI as a user runs it: real subprocesses, real artifacts, clear errors on bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import relaxlm
from relaxlm.artifacts import Manifest, is_artifact
from relaxlm.errors import RelaxlmError

ROOT = Path(__file__).resolve().parents[1]


def relaxlm_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "relaxlm", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        **kwargs,
    )


def assert_clean_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    """One clear message (after any progress lines), non-zero exit, no traceback."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: "), proc.stderr
    assert sum(line.startswith("error: ") for line in lines) == 1, proc.stderr
    for word in words:
        assert word in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def artifact(checkpoints, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "llama"
    proc = relaxlm_cli("compile", checkpoints("llama_gqa"), "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "artifact written" in proc.stderr  # progress is shown
    assert "scheduling kernels" in proc.stderr  # in the long steps too
    assert "Warning" not in proc.stderr  # TVM's "Fast mode segfaults..." of unclipped gathers
    return out


def test_artifact_round_trips_into_a_fresh_process(artifact, compiled):
    ids = [1, 17, 42, 99, 7, 256, 3, 11, 64, 5]
    script = (
        "import sys, numpy as np, relaxlm;"
        f"llm = relaxlm.LLM({str(artifact)!r});"
        f"np.save(sys.argv[1], llm.score({ids}, prefill=4));"
        "print([m for m in sys.modules if m.startswith(('relaxlm.compiler', 'relaxlm.frontends'))])"
    )
    out = artifact.parent / "fresh.npy"
    proc = subprocess.run([sys.executable, "-c", script, out], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"  # loading an artifact imports no compiler code
    fresh = np.load(out)
    in_process = compiled("llama_gqa").score(ids, prefill=4)
    np.testing.assert_allclose(fresh, in_process, rtol=0, atol=1e-5)


def test_inspect_shows_the_manifest(artifact):
    proc = relaxlm_cli("inspect", artifact)
    assert proc.returncode == 0, proc.stderr
    m = Manifest.read(artifact)
    for text in (
        "LlamaForCausalLM",
        "float32",
        f"{m.context_window}",
        "lib/cpu.so",
        "tokenizer.json",
    ):
        assert text in proc.stdout
    raw = json.loads(relaxlm_cli("inspect", artifact, "--json").stdout)
    assert raw["format_version"] == m.format_version
    assert [p["name"] for p in raw["params"]] == [p["name"] for p in m.params]


def test_a_damaged_shard_fails_load_and_inspect_verify_finds_a_flipped_byte(artifact, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(artifact, damaged)
    shard = damaged / "weights" / "shard-000.safetensors"
    good = shard.read_bytes()

    shard.write_bytes(good[:-4])  # truncated: the size check at load
    with pytest.raises(RelaxlmError, match=r"shard-000.safetensors is \d+ bytes, but the manifest"):
        relaxlm.LLM(str(damaged))
    shard.write_bytes(b"\0" + good[1:])  # the header length's low byte: no longer parses
    with pytest.raises(RelaxlmError, match="shard-000.safetensors: corrupt or truncated"):
        relaxlm.LLM(str(damaged))
    name = Manifest.read(damaged).params[0]["name"].encode()
    shard.write_bytes(good.replace(b'"' + name + b'"', b'"' + name[:-1] + b'#"', 1))
    with pytest.raises(RelaxlmError, match="params not in the shards: .*recompile"):
        relaxlm.LLM(str(damaged))

    flipped = bytearray(good)
    flipped[-1] ^= 0xFF  # in the last tensor's data: sizes and headers still agree
    shard.write_bytes(bytes(flipped))
    relaxlm.LLM(str(damaged))  # loads: only `inspect --verify` hashes
    assert_clean_error(
        relaxlm_cli("inspect", damaged, "--verify"), "shard-000.safetensors", "checksum"
    )
    proc = relaxlm_cli("inspect", artifact, "--verify")
    assert proc.returncode == 0, proc.stderr
    assert "match their SHA-256" in proc.stdout


def test_run_streams_an_answer(artifact):
    proc = relaxlm_cli(
        "run", artifact, "--prompt", "the cat", "--max-tokens", "8", "--temperature", "0"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


def test_interactive_chat_uses_the_template(artifact):
    proc = relaxlm_cli(
        "run", artifact, "--max-tokens", "4", "--temperature", "0", input="hello\n/exit\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("> ")


def test_missing_folder(tmp_path):
    assert_clean_error(
        relaxlm_cli("compile", tmp_path / "nope", "-o", tmp_path / "out"), "not found"
    )


def test_unknown_architecture(checkpoints, tmp_path):
    src = checkpoints("llama_gqa")
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in src.iterdir():
        (bad / f.name).symlink_to(f)
    (bad / "config.json").unlink()
    config = json.loads((src / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "architectures": ["FooForCausalLM"]}))
    proc = relaxlm_cli("compile", bad, "-o", tmp_path / "out")
    assert_clean_error(proc, "FooForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM")


def test_truncated_safetensors(checkpoints, tmp_path):
    src = checkpoints("llama_gqa")
    bad = tmp_path / "trunc"
    bad.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (bad / f.name).symlink_to(f)
    data = (src / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) * 2 // 3])
    assert_clean_error(relaxlm_cli("compile", bad, "-o", tmp_path / "out"), "model.safetensors")


def test_manifest_of_another_format_version(artifact, tmp_path):
    copy = tmp_path / "old"
    copy.mkdir()
    for f in artifact.iterdir():
        (copy / f.name).symlink_to(f)
    (copy / "manifest.json").unlink()
    manifest = json.loads((artifact / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format_version": 0}))
    assert_clean_error(relaxlm_cli("run", copy, "--prompt", "hi"), "format version", "recompile")


def test_prompt_longer_than_the_context_window(artifact):
    window = Manifest.read(artifact).context_window
    long_prompt = " ".join(["cat"] * (window + 10))
    assert_clean_error(relaxlm_cli("run", artifact, "--prompt", long_prompt), "context window")


def test_killed_compile_leaves_no_artifact(checkpoints, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "relaxlm", "compile", str(checkpoints("llama_gqa")), "-o", str(out)],
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stderr:  # kill it in the middle, while it generates code
        if "generating code" in line:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not is_artifact(out)
    assert_clean_error(relaxlm_cli("run", out, "--prompt", "hi"))


def test_threads_option_sizes_the_kernel_thread_pool(artifact):
    script = (
        "import os, sys, relaxlm;"
        "llm = relaxlm.LLM(sys.argv[1], threads=int(sys.argv[2]));"
        "llm.generate([[1, 5, 9]], relaxlm.SamplingParams(max_tokens=2));"
        "print(len(os.listdir('/proc/self/task')))"
    )

    def tasks(threads: int) -> int:
        proc = subprocess.run(
            [sys.executable, "-c", script, artifact, str(threads)], capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        return int(proc.stdout.split()[-1])

    # Two more kernel workers (TVM's default here would be one thread: it halves the CPU count
    # on x86); the engine's own thread may or may not still be alive, hence >=.
    assert tasks(3) >= tasks(1) + 2


def test_compile_refuses_to_replace_another_model(checkpoints, artifact, tmp_path):
    out = tmp_path / "other"
    shutil.copytree(artifact, out)
    before = (out / "manifest.json").read_text()
    proc = relaxlm_cli("compile", checkpoints("llama_mqa"), "-o", out)
    assert_clean_error(proc, "another model", "--force")
    assert (out / "manifest.json").read_text() == before  # nothing compiled, nothing replaced
    # The same checkpoint again is a recompile, not a replacement: allowed.
    same = relaxlm_cli("compile", Manifest.read(out).source["path"], "-o", out)
    assert same.returncode == 0, same.stderr


def test_bad_thread_counts_are_refused_and_quant_help_lists_the_schemes():
    for bad in ("0", "-2", "two"):
        proc = relaxlm_cli("run", "--threads", bad, "--prompt", "hi")
        assert proc.returncode == 2 and "not a positive integer" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    help_text = " ".join(relaxlm_cli("compile", "--help").stdout.split())
    assert "none, q8, q4, q4-a8, q4-asym, float16, bfloat16" in help_text


def test_cache_list_and_clear(checkpoints, tmp_path):
    env = {**os.environ, "RELAXLM_CACHE": str(tmp_path / "cache")}
    proc = relaxlm_cli(
        "run", checkpoints("llama_gqa"), "--prompt", "hi", "--max-tokens", "2", env=env
    )
    assert proc.returncode == 0, proc.stderr
    # A compile killed long ago left its work folder; its process is gone.
    stale = tmp_path / "cache" / "artifacts" / ".model-abc.partial-999999999-x1"
    stale.mkdir()
    listed = relaxlm_cli("cache", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert str(checkpoints("llama_gqa")) in listed.stdout and "1 artifact(s)" in listed.stdout
    assert not stale.exists()
    name = listed.stdout.split()[0]
    assert_clean_error(relaxlm_cli("cache", "clear", "no-such-entry", env=env), "cache list")
    cleared = relaxlm_cli("cache", "clear", name, env=env)
    assert cleared.returncode == 0 and "removed 1 artifact(s)" in cleared.stdout, cleared.stderr
    assert "0 artifact(s)" in relaxlm_cli("cache", "list", env=env).stdout


# Each damage turns an artifact copy into one that must fail to load with one RelaxlmError
# before any native code runs (a page size of 0 once crashed with SIGFPE, a larger vocab_size
# with SIGSEGV): (name, manifest edit or file damage).
_DAMAGE = {
    "manifest is a list": lambda m, d: "[]",
    "manifest is null": lambda m, d: "null",
    "manifest is a string": lambda m, d: '"artifact"',
    "manifest not UTF-8": lambda m, d: b'{"format": "\xff\xfe"}',
    "param renamed": lambda m, d: m["params"][0].update(name="model.renamed.weight"),
    "param removed": lambda m, d: m["params"].pop(1),
    "params reordered": lambda m, d: m["params"].insert(0, m["params"].pop(2)),
    "param shape wrong": lambda m, d: m["params"][0].update(shape=[3, 3]),
    "param dtype unknown": lambda m, d: m["params"][0].update(dtype="F8"),
    "param in no shard": lambda m, d: m["params"][0].update(shard="weights/other.safetensors"),
    "shards empty": lambda m, d: m.update(shards={}),
    "shard size a string": lambda m, d: next(iter(m["shards"].values())).update(size="big"),
    "shard outside": lambda m, d: m.update(shards={"../x": next(iter(m["shards"].values()))}),
    "targets empty": lambda m, d: m.update(targets={}),
    "target without library": lambda m, d: m.update(targets={"cpu": {"size": 1}}),
    "page size 0": lambda m, d: m["kv_cache"].update(page_size=0),
    "page size missing": lambda m, d: m["kv_cache"].pop("page_size"),
    "vocab larger than the model's": lambda m, d: m.update(vocab_size=100000),
    "context window negative": lambda m, d: m.update(context_window=-1),
    "prefill chunk a string": lambda m, d: m.update(prefill_chunk_size="16"),
    "task unknown": lambda m, d: m.update(task="dance"),
    "tokenizer.json invalid": lambda m, d: (d / "tokenizer" / "tokenizer.json").write_text("{"),
}


def test_damaged_artifacts_fail_with_one_clear_error(artifact, tmp_path):
    copies = []
    for i, (name, damage) in enumerate(_DAMAGE.items()):
        copy = tmp_path / f"d{i}"
        shutil.copytree(artifact, copy)
        manifest = json.loads((copy / "manifest.json").read_text())
        text = damage(manifest, copy)
        if not isinstance(text, str | bytes):
            text = json.dumps(manifest)
        path = copy / "manifest.json"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        copies.append((name, str(copy)))
    # One child process loads them all: a crash in native code fails the test, not pytest.
    script = (
        "import json, sys, relaxlm\n"
        "from relaxlm.errors import RelaxlmError\n"
        "for name, path in json.loads(sys.argv[1]):\n"
        "    try:\n"
        "        relaxlm.LLM(path)\n"
        "        print(name, '-> loaded', flush=True)\n"
        "    except RelaxlmError as e:\n"
        "        print(name, '-> error:', str(e).splitlines()[0][:200], flush=True)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(copies)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    outcomes = dict(line.split(" -> ", 1) for line in proc.stdout.splitlines())
    assert set(outcomes) == set(_DAMAGE), proc.stdout
    loaded = [name for name, outcome in outcomes.items() if not outcome.startswith("error:")]
    assert not loaded, proc.stdout
    # The command line reports it as one error line and exit code 2.
    page_size_0 = copies[list(_DAMAGE).index("page size 0")][1]
    proc = relaxlm_cli("run", page_size_0, "--prompt", "hi")
    assert_clean_error(proc, "page_size")
    assert proc.returncode == 2


def test_bad_device_names_and_libraries_are_clear_errors(artifact, tmp_path):
    # TVM 0.27 has no tvm.error.TVMError: catching it raised AttributeError instead.
    with pytest.raises(RelaxlmError, match="'cpu:abc' is not a device name"):
        relaxlm.LLM(str(artifact), device="cpu:abc")
    broken = tmp_path / "broken"
    shutil.copytree(artifact, broken)
    library = broken / Manifest.read(broken).targets["cpu"]["library"]
    manifest = json.loads((broken / "manifest.json").read_text())
    library.write_bytes(b"not a shared library".ljust(library.stat().st_size, b"\0"))
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RelaxlmError, match="library does not load"):
        relaxlm.LLM(str(broken))


def test_ctrl_c_stops_the_reply_not_the_chat(compiled, monkeypatch, capsys):
    from relaxlm.cli import _chat

    llm = compiled("llama_gqa")
    params = relaxlm.SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    stream = llm.stream

    def interrupted_stream(messages, p):  # Ctrl-C arrives after two pieces of the first reply
        for i, delta in enumerate(stream(messages, p)):
            if i == 2 and len(messages) == 1:
                raise KeyboardInterrupt
            yield delta

    lines = iter(["hello", "again", "/exit"])
    monkeypatch.setattr(llm, "stream", interrupted_stream)
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    _chat(llm, params)  # returns at /exit: the interrupt ended only the first reply
    out = capsys.readouterr()
    assert "[stopped]" in out.err
    first, second = out.out.splitlines()[:2]
    assert len(first) < len(second)  # the second reply ran to its 20 tokens
    assert llm.metrics().running == 0  # the stopped request freed its sequence
