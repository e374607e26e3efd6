"""Reading checkpoints: repo ids through the Hugging Face cache, and the weight checks."""

import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
from safetensors.numpy import load_file, save_file

from relaxlm.errors import RelaxlmError
from relaxlm.frontends import export, load_checkpoint


def _fake_hub_cache(cache: Path, repo_id: str, src: Path) -> None:
    """The layout huggingface_hub writes: models--owner--name/{refs/main, snapshots/<rev>/}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    rev = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    shutil.copytree(src, repo / "snapshots" / rev)


def test_repo_id_resolves_through_the_offline_cache(checkpoints, tmp_path, monkeypatch):
    _fake_hub_cache(tmp_path, "tiny-org/tiny-llama", checkpoints("llama_gqa"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ckpt = load_checkpoint("tiny-org/tiny-llama")
    assert ckpt.architecture == "LlamaForCausalLM"
    assert "model.embed_tokens.weight" in ckpt.tensors


def test_repo_id_not_cached_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RelaxlmError, match="not in the local Hugging Face cache.*HF_HUB_OFFLINE"):
        load_checkpoint("tiny-org/absent-model")
    # The command to suggest is the one huggingface_hub installs today (`huggingface-cli` is gone).
    with pytest.raises(RelaxlmError, match="`hf download tiny-org/absent-model`"):
        load_checkpoint("tiny-org/absent-model")
    assert shutil.which("hf", path=str(Path(sys.executable).parent))


def test_sharded_checkpoint_is_indexed(checkpoints):
    ckpt = load_checkpoint(checkpoints("mistral"))  # written with a small max_shard_size
    assert len(ckpt.weight_files) > 1
    index = json.loads((ckpt.path / "model.safetensors.index.json").read_text())
    assert set(ckpt.tensors) == set(index["weight_map"])


def _copy_with_weights(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    save_file(edit(weights), dst / "model.safetensors")
    return dst


def test_missing_weights_are_all_listed(checkpoints, tmp_path):
    def drop(w):
        del w["model.layers.0.mlp.up_proj.weight"], w["model.layers.1.self_attn.q_proj.weight"]
        return w

    bad = _copy_with_weights(checkpoints("llama_gqa"), tmp_path / "m", drop)
    with pytest.raises(RelaxlmError) as e:
        export(load_checkpoint(bad))
    assert "model.layers.0.mlp.up_proj.weight" in str(e.value)
    assert "model.layers.1.self_attn.q_proj.weight" in str(e.value)


def test_wrong_shape_is_an_error(checkpoints, tmp_path):
    def shrink(w):
        w["model.norm.weight"] = w["model.norm.weight"][:-1]
        return w

    bad = _copy_with_weights(checkpoints("llama_gqa"), tmp_path / "m", shrink)
    with pytest.raises(RelaxlmError, match="model.norm.weight"):
        export(load_checkpoint(bad))


def test_unused_tensors_are_a_warning(checkpoints, tmp_path, caplog):
    def extra(w):
        w["model.unused.weight"] = w["model.norm.weight"].copy()
        return w

    ok = _copy_with_weights(checkpoints("llama_gqa"), tmp_path / "m", extra)
    with caplog.at_level(logging.WARNING):
        export(load_checkpoint(ok))
    assert "model.unused.weight" in caplog.text


def test_unknown_rope_type_is_refused(checkpoints, tmp_path):
    bad = tmp_path / "m"
    shutil.copytree(checkpoints("llama_gqa"), bad)
    config = json.loads((bad / "config.json").read_text())
    config.pop("rope_parameters", None)
    config["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(RelaxlmError, match="rope type 'dynamic'"):
        export(load_checkpoint(bad))
