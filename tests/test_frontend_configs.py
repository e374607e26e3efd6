"""Config readers: sliding windows, RoPE and refusals read as transformers reads config.json."""

import json
import shutil

import pytest
import transformers

from relaxlm.errors import RelaxlmError
from relaxlm.frontends import ARCHITECTURES, export, load_checkpoint
from relaxlm.frontends.config import layer_windows, rope_from_config
from relaxlm.frontends.gemma3 import Gemma3Config
from relaxlm.frontends.ops import RopeSpec

TINY = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 7,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


def _windows_from_hf(config: transformers.PretrainedConfig) -> list[int]:
    return [config.sliding_window if t == "sliding_attention" else 0 for t in config.layer_types]


@pytest.mark.parametrize(
    "arch, fields",
    [
        ("Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 8}),
        ("Qwen2ForCausalLM", {"use_sliding_window": False, "sliding_window": 8}),
        ("Qwen3ForCausalLM", {"use_sliding_window": True, "sliding_window": 8}),
        ("Gemma2ForCausalLM", {"sliding_window": 8, "head_dim": 16}),
        ("Gemma3ForCausalLM", {"sliding_window": 8, "head_dim": 16}),
        ("Gemma3ForCausalLM", {"sliding_window": 8, "head_dim": 16, "sliding_window_pattern": 3}),
    ],
)
def test_windows_without_layer_types_follow_transformers(arch, fields):
    """Older config.json files have no `layer_types`: each family's default pattern applies."""
    model_cls = getattr(transformers, arch)
    hf = model_cls.config_class(**TINY, max_window_layers=3, **fields)
    raw = {**hf.to_dict(), "architectures": [arch]}
    del raw["layer_types"]
    if "sliding_window_pattern" in fields:
        raw["sliding_window_pattern"] = fields["sliding_window_pattern"]
    read_config, _ = ARCHITECTURES[arch]
    expected = _windows_from_hf(hf) if hf.sliding_window else [0] * TINY["num_hidden_layers"]
    assert read_config(raw).layer_windows == expected


def test_mistral_window_applies_to_every_layer_unless_it_never_binds():
    assert layer_windows({"sliding_window": 8}, 3) == [8, 8, 8]
    assert layer_windows({"sliding_window": 4096, "max_position_embeddings": 4096}, 3) == [0] * 3
    assert layer_windows({"sliding_window": None}, 3) == [0] * 3


def test_unknown_layer_type_is_refused():
    raw = {"sliding_window": 8, "layer_types": ["sliding_attention", "chunked_attention"]}
    with pytest.raises(RelaxlmError, match="chunked_attention"):
        layer_windows(raw, 2)


def test_gemma3_rope_bases_from_old_and_new_keys():
    base = {**TINY, "num_hidden_layers": 2, "head_dim": 16}
    old = {**base, "rope_theta": 1e6, "rope_local_base_freq": 1e4, "rope_scaling": None}
    old["rope_scaling"] = {"rope_type": "linear", "factor": 8.0}
    new = transformers.Gemma3TextConfig(**base, rope_scaling=old["rope_scaling"]).to_dict()
    for raw in (old, new):
        config = Gemma3Config.from_dict(raw)
        assert config.rope == RopeSpec(theta=1e6, rotary_dim=16, scale=8.0)
        assert config.local_rope == RopeSpec(theta=1e4, rotary_dim=16)


def test_longrope_attention_factor_follows_transformers():
    rope = rope_from_config(
        {"max_position_embeddings": 131072, "original_max_position_embeddings": 4096},
        96,
        {"rope_type": "su", "short_factor": [1.0] * 48, "long_factor": [2.0] * 48},
    )
    # transformers: sqrt(1 + log(131072 / 4096) / log(4096))
    assert rope.scaling["attention_factor"] == pytest.approx(1.1902380714238083)
    assert rope.scaling["rope_type"] == "longrope" and rope.rotary_dim == 96


def _edited(checkpoint, tmp_path, **changes):
    copy = tmp_path / "m"
    shutil.copytree(checkpoint, copy)
    config = json.loads((copy / "config.json").read_text())
    config.update(changes)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize(
    "case, changes, named",
    [
        ("gemma2", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ("gemma2", {"hidden_activation": "gelu_fast"}, "hidden_activation 'gelu_fast'"),
        ("gpt2", {"add_cross_attention": True}, "add_cross_attention"),
        ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        (
            "qwen3",
            {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}},
            "rope type 'yarn'",
        ),
    ],
)
def test_unimplemented_config_fails_at_compile_time(checkpoints, tmp_path, case, changes, named):
    with pytest.raises(RelaxlmError, match=named):
        export(load_checkpoint(_edited(checkpoints(case), tmp_path, **changes)))
