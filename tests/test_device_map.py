"""A model split across devices (`--device-map`): a tiny 4-layer Llama in three pipeline stages
on TVM's cpu(0) and cpu(1), against the same checkpoint compiled for one device (the oracle,
itself checked against transformers here and in test_parity): logits through prefill, decode,
fork and popn, and greedy tokens through the engine (batching, prefix cache). Bad maps are one
clear error."""

import json
import shutil

import numpy as np
import pytest
from hf_models import hf_greedy, make_model

import relaxlm
from relaxlm import SamplingParams
from relaxlm.artifacts import Manifest
from relaxlm.artifacts.device_map import Stage, gpu_layers_map, parse_device_map
from relaxlm.cli import main
from relaxlm.errors import RelaxlmError
from relaxlm.runtime.model import CompiledModel
from relaxlm.testing.split_parity import assert_split_equals_whole

# Three stages over two devices: the hidden state goes cpu:0 -> cpu:1 -> cpu:0, and the middle
# stage takes and returns it (the first embeds tokens, the last ends in logits).
DEVICE_MAP = "cpu:0:0,cpu:1:1-2,cpu:0:3"
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("llama4"), seed=7, num_hidden_layers=4)


@pytest.fixture(scope="module")
def whole(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "artifact"
    return relaxlm.compile(checkpoint, output=out, progress=False)


@pytest.fixture(scope="module")
def split(checkpoint):
    """The checkpoint split by DEVICE_MAP, compiled into the (test session's) cache by LLM."""
    return relaxlm.LLM(str(checkpoint), device_map=DEVICE_MAP).artifact


def test_the_manifest_records_each_stage_with_its_layers_weights_and_cache(split):
    m = Manifest.read(split)
    assert m.targets == {}
    assert [(s["device"], s["layers"], s["target"]) for s in m.stages] == [
        ("cpu:0", [0, 1], "cpu"),
        ("cpu:1", [1, 3], "cpu"),
        ("cpu:0", [3, 4], "cpu"),
    ]
    assert [s["kv_cache"]["num_layers"] for s in m.stages] == [1, 2, 1]  # its layers' pages only
    first, middle, last = ({p.split(".")[1] for p in s["params"]} for s in m.stages)
    assert "embed_tokens" in first and "norm" not in first
    assert middle == {"layers"}
    assert {p for p in m.stages[1]["params"] if ".layers." in p} == {
        p for p in m.stages[1]["params"] if p.startswith(("model.layers.1.", "model.layers.2."))
    }
    assert "lm_head.weight" in m.stages[2]["params"] and "norm" in last
    assert {n for s in m.stages for n in s["params"]} == {p["name"] for p in m.params}


def test_logits_equal_the_single_device_artifact(whole, split):
    one, three = CompiledModel(whole, max_batch_size=4), CompiledModel(split, max_batch_size=4)
    assert [str(s.device) for s in three.stages] == ["cpu:0", "cpu:1", "cpu:0"]
    assert_split_equals_whole(one, three, atol=1e-5, decode_steps=6)


def test_the_split_model_generates_what_transformers_does(checkpoint, split):
    prompt = [1, 17, 42, 99, 3, 250]
    llm = relaxlm.LLM(str(split))
    assert llm.generate([prompt], GREEDY)[0].token_ids == hf_greedy(checkpoint, prompt, 10)


def test_engine_batches_and_reuses_prefixes_with_the_same_tokens(whole, split):
    rng = np.random.default_rng(1)
    prefix = [1, *rng.integers(5, 400, 47).tolist()]  # three full 16-token pages
    prompts = [prefix + rng.integers(5, 400, n).tolist() for n in (3, 9, 14, 5)]
    prompts += [rng.integers(5, 400, n).tolist() for n in (30, 2)]
    oracle = relaxlm.LLM(str(whole), enable_prefix_cache=False)
    want = [oracle.generate([p], GREEDY)[0].token_ids for p in prompts]  # one at a time
    llm = relaxlm.LLM(str(split), max_batch_size=4, max_prefill_tokens=64)
    llm.generate([prompts[0]], GREEDY)  # computes the shared prefix's pages
    results = llm.generate(prompts, GREEDY)  # six requests, four decoding at a time
    assert [r.token_ids for r in results] == want
    hits = llm.metrics().prefix_cache_hit_tokens
    assert hits >= 4 * 48  # every prompt that shares the prefix took its pages from the cache
    # Speculative decoding verifies drafts in one forward and pops the rejected ones (popn) from
    # every stage's cache.
    speculative = relaxlm.LLM(str(split), draft_model="ngram", num_draft_tokens=3)
    assert [r.token_ids for r in speculative.generate(prompts, GREEDY)] == want


def test_the_cli_runs_a_split_model(checkpoint, split, capsys):
    # The checkpoint with its map is the cache's artifact (split); the CLI's answer is the SDK's.
    args = ["run", str(checkpoint), "--device-map", DEVICE_MAP, "--raw", "--prompt", "a b"]
    assert main([*args, "--max-tokens", "5", "--temperature", "0"]) == 0
    want = relaxlm.LLM(str(split)).generate(["a b"], SamplingParams(max_tokens=5, temperature=0))
    assert capsys.readouterr().out.strip() == want[0].text.strip()


@pytest.mark.parametrize(
    "device_map, says",
    [
        ("cpu:0:0-1,cpu:1:1-3", "overlaps 'cpu:0:0-1' (layer 1 is on both)"),
        ("cpu:0:0-1,cpu:1:3", "layer 2 is on no device"),
        ("cpu:0:0-2", "the model has 4 layers, and layer 3 is on no device"),
        ("cpu:0:0-1,cpu:1:2-5", "names layer 5, but the model has 4 layers"),
        ("tpu:0:0-1,cpu:2-3", "unknown device 'tpu'"),
        ("cpu:0:0-1;cpu:1:2-3", "is not DEVICE:FIRST-LAST"),
        ("cpu:0:2-3,cpu:1:0-1", "layers 0-1 are on no device"),
    ],
)
def test_a_bad_device_map_is_one_clear_error(checkpoint, tmp_path, capsys, device_map, says):
    code = main(["compile", str(checkpoint), "-o", str(tmp_path / "x"), "--device-map", device_map])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: device map") and says in err
    assert "Traceback" not in err and not (tmp_path / "x").exists()


def test_a_device_map_must_fit_the_artifact(whole, split, capsys):
    with pytest.raises(RelaxlmError, match="only the device ordinals may change"):
        CompiledModel(split, device_map="cpu:0:0-1,cpu:1:2-3")
    with pytest.raises(RelaxlmError, match="was compiled for one device"):
        CompiledModel(whole, device_map=DEVICE_MAP)
    # Other ordinals of the same kinds are a load-time choice.
    swapped = CompiledModel(split, device_map="cpu:1:0,cpu:0:1-2,cpu:1:3")
    assert [str(s.device) for s in swapped.stages] == ["cpu:1", "cpu:0", "cpu:1"]
    code = main(["run", str(split), "--gpu-layers", "2", "--prompt", "a"])
    assert code == 2 and "gpu_layers splits a model at compile time" in capsys.readouterr().err


def test_a_cuda_stage_is_lowered_onto_a_cache_of_its_own_layers(checkpoint):
    """Compile-only (no GPU here): layers 2-3 as the last stage, for CUDA, through phases 1-3."""
    from relaxlm.compiler.pipeline import build_library
    from relaxlm.compiler.targets import resolve_target
    from relaxlm.frontends import load_checkpoint
    from relaxlm.frontends import split as split_model

    stage = split_model(load_checkpoint(checkpoint)).export(2, 4)
    mod, kv_cache, plan = build_library(stage, resolve_target("cuda"), scheduled_only=True)
    assert kv_cache.num_layers == 2
    assert {w.name.split(".")[2] for w in plan if ".layers." in w.name} == {"2", "3"}
    assert "lm_head.weight" in {w.name for w in plan}
    x = mod["prefill"].params[0]  # the hidden state the stage before hands over
    assert len(x.ty.shape) == 3 and int(x.ty.shape[2]) == 64 and x.ty.dtype == "float32"
    assert "create_paged_kv_cache" in {gv.name_hint for gv in mod.get_global_vars()}


@pytest.mark.parametrize(
    "damage, says",
    [
        (lambda m: m["stages"][1]["params"].append("nope.weight"), "stage 1 takes parameters"),
        (lambda m: m["stages"][1].update(layers=[2, 3]), "do not cover the layers in order"),
        (lambda m: m["stages"][2].update(library="../x.so"), "lies outside the artifact"),
    ],
)
def test_a_damaged_stage_entry_is_refused_at_load(split, tmp_path, damage, says):
    copy = tmp_path / "artifact"
    shutil.copytree(split, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    damage(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RelaxlmError, match=f"damaged manifest.*{says}"):
        CompiledModel(copy)


def test_a_tied_table_split_across_stages_is_packed_as_in_the_whole_model(checkpoints):
    """q4 with tied embeddings: the whole model packs the one table in 8 bits for the gather and
    the logits head alike; split, the first stage gathers from and the last multiplies by that
    same tensor (checked by hand: logits bit-identical to the whole q4 artifact)."""
    from relaxlm.compiler.pipeline import _shared_schemes, build_library
    from relaxlm.compiler.quantization import resolve_scheme
    from relaxlm.compiler.targets import resolve_target
    from relaxlm.frontends import export, load_checkpoint
    from relaxlm.frontends import split as split_model

    checkpoint = load_checkpoint(checkpoints("llama_tied_llama3_rope"))
    scheme, cpu = resolve_scheme("q4"), resolve_target("cpu")
    parts = split_model(checkpoint)
    stages = [parts.export(0, 1), parts.export(1, 2)]

    def table(exported, stored=None):
        _, _, plan = build_library(exported, cpu, scheme, stored=stored, scheduled_only=True)
        return [w for w in plan if w.sources == ("model.embed_tokens.weight",)]

    whole = table(export(checkpoint))
    assert [w.name for w in whole] == [
        "model.embed_tokens.weight.q",
        "model.embed_tokens.weight.scale",
    ]
    for k, stage in enumerate(stages):
        assert table(stage, _shared_schemes(stages, k, scheme)) == whole


def test_gpu_layers_puts_the_last_layers_on_the_gpu_as_llama_cpp(checkpoint, tmp_path, capsys):
    assert gpu_layers_map(3, 8) == [Stage("cpu:0", 0, 5), Stage("cuda:0", 5, 8)]
    assert gpu_layers_map(0, 8) == [Stage("cpu:0", 0, 8)]
    assert gpu_layers_map(99, 8, "metal") == [Stage("metal:0", 0, 8)]
    assert parse_device_map("cuda:1:0-23, cpu:24-31") == [
        Stage("cuda:1", 0, 24),
        Stage("cpu:0", 24, 32),
    ]
    assert json.dumps(str(Stage("cuda:0", 5, 6))) == '"cuda:0:5"'
    out = str(tmp_path / "x")
    code = main(["compile", str(checkpoint), "-o", out, "--gpu-layers", "2", "--device-map", "cpu"])
    assert code == 2 and "a device map or gpu_layers, not both" in capsys.readouterr().err
