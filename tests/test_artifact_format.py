"""The artifact format alone: streamed safetensors shards, the manifest, atomic commit."""

import json
import os
import subprocess
import time

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from relaxlm.artifacts import (
    ArtifactWriter,
    Manifest,
    check_files,
    is_artifact,
    verify,
    weight_index,
)
from relaxlm.artifacts.safetensors_io import ShardWriter, index_file, read
from relaxlm.errors import RelaxlmError


def _manifest(writer: ArtifactWriter) -> Manifest:
    """A manifest of what `writer` wrote, for a made-up model."""
    return Manifest(
        relaxlm_version="0",
        tvm_version="0",
        architecture="LlamaForCausalLM",
        model_config={},
        dtype="float32",
        quantization={"scheme": "none"},
        context_window=16,
        prefill_chunk_size=16,
        vocab_size=8,
        kv_cache={
            "page_size": 16,
            "num_layers": 1,
            "num_q_heads": 1,
            "num_kv_heads": 1,
            "head_dim": 4,
        },
        params=writer.params,
        shards=writer.shards,
        targets=writer.targets,
        tokenizer={"files": writer.tokenizer_files},
    )


def test_streamed_shard_is_read_by_the_safetensors_library(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "a": rng.standard_normal((3, 5)).astype("float32"),
        "b": rng.standard_normal((7,)).astype("float16"),
        "c": rng.integers(0, 2**31, (2, 2), dtype=np.uint32),
    }
    writer = ShardWriter(
        tmp_path / "x.safetensors", [(k, v.shape, v.dtype) for k, v in tensors.items()]
    )
    for k, v in tensors.items():
        writer.write(k, v)
    writer.close()
    loaded = load_file(tmp_path / "x.safetensors")
    for k, v in tensors.items():
        np.testing.assert_array_equal(loaded[k], v)


def test_bfloat16_round_trips_through_memory_map(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(3, 4).astype(ml_dtypes.bfloat16)
    writer = ShardWriter(tmp_path / "b.safetensors", [("x", x.shape, x.dtype)])
    writer.write("x", x)
    writer.close()
    info = index_file(tmp_path / "b.safetensors")["x"]
    np.testing.assert_array_equal(read(info).astype(np.float32), x.astype(np.float32))


def test_truncated_shard_is_a_clear_error(tmp_path):
    x = np.ones((64, 64), np.float32)
    writer = ShardWriter(tmp_path / "t.safetensors", [("x", x.shape, x.dtype)])
    writer.write("x", x)
    writer.close()
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(RelaxlmError, match="truncated|corrupt"):
        index_file(tmp_path / "t.safetensors")


def test_commit_is_atomic_and_checksummed(tmp_path):
    out = tmp_path / "art"
    x = np.ones((4, 4), np.float32)
    with ArtifactWriter(out) as w:
        w.write_weights([("x", (4, 4), np.dtype("float32"))], [("x", x)])
        assert not is_artifact(out)  # nothing at the destination until commit
        w.commit(_manifest(w))
    assert is_artifact(out)
    m = Manifest.read(out)
    assert m.params == [
        {"name": "x", "shape": [4, 4], "dtype": "F32", "shard": "weights/shard-000.safetensors"}
    ]
    verify(out, m)
    np.testing.assert_array_equal(read(weight_index(out, m)["x"]), x)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers

    shard = out / "weights" / "shard-000.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    check_files(out, m)  # the load's check sees sizes only
    with pytest.raises(RelaxlmError, match="checksum"):
        verify(out, m)
    shard.write_bytes(bytes(raw[:-1]))
    with pytest.raises(RelaxlmError, match=r"is \d+ bytes, but the manifest records \d+"):
        check_files(out, m)


def test_failure_before_commit_leaves_nothing(tmp_path):
    out = tmp_path / "art"
    with pytest.raises(RuntimeError), ArtifactWriter(out) as w:
        w.write_weights([("x", (2,), np.dtype("float32"))], [("x", np.zeros(2, np.float32))])
        raise RuntimeError("killed")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_other_format_version_is_refused(tmp_path):
    out = tmp_path / "art"
    with ArtifactWriter(out) as w:
        w.commit(_manifest(w))
    data = json.loads((out / "manifest.json").read_text())
    data["format_version"] = 99
    (out / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(RelaxlmError, match="format version 99"):
        Manifest.read(out)


def test_stale_work_folders_are_removed_and_live_ones_kept(tmp_path):
    gone = subprocess.Popen(["true"])  # a finished child: its PID names no process
    gone.wait()
    stale = tmp_path / f".art.partial-{gone.pid}-abc"
    live = tmp_path / f".art.partial-{os.getpid()}-def"
    old = tmp_path / f".art.old-{gone.pid}"
    legacy = tmp_path / ".art.partial-k2j4h"  # named before PIDs were recorded, two hours old
    other = tmp_path / "art"
    for folder in (stale, live, old, legacy, other):
        folder.mkdir()
    os.utime(legacy, (time.time() - 7200, time.time() - 7200))
    with ArtifactWriter(tmp_path / "new") as w:  # every compile sweeps the output's folder
        w.commit(_manifest(w))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "art", "new"])
