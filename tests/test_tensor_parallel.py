"""Tensor parallelism (`--tensor-parallel N`): a tiny GQA Llama (8 query heads, 4 key/value
heads) in 2 and 4 shards run by TVM Disco, against the same checkpoint compiled whole (the
oracle, itself checked against transformers here and in test_parity): logits through a batched
prefill, decodes, fork and popn, and greedy tokens through the engine (batching, prefix cache),
in a ThreadedSession and a ProcessSession; a Qwen2 with q/k/v biases. Refusals are one clear
error each."""

import json
import shutil

import numpy as np
import pytest
from hf_models import hf_greedy, make_model

import relaxlm
from relaxlm import SamplingParams
from relaxlm.artifacts import Manifest
from relaxlm.cli import main
from relaxlm.errors import RelaxlmError
from relaxlm.runtime.model import CompiledModel
from relaxlm.testing.split_parity import assert_split_equals_whole

GQA = {"num_attention_heads": 8, "num_key_value_heads": 4}  # head_dim 8, intermediate 128
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("llama_gqa"), seed=3, **GQA)


@pytest.fixture(scope="module")
def whole(checkpoint, tmp_path_factory):
    return relaxlm.compile(checkpoint, output=tmp_path_factory.mktemp("w") / "a", progress=False)


@pytest.fixture(scope="module")
def sharded(checkpoint, tmp_path_factory):
    """Shard count -> the checkpoint compiled in that many shards."""
    out = tmp_path_factory.mktemp("tp")
    return {
        n: relaxlm.compile(checkpoint, output=out / f"tp{n}", progress=False, tensor_parallel=n)
        for n in (2, 4)
    }


def test_the_manifest_holds_the_shard_plan(whole, sharded):
    m = Manifest.read(sharded[4])
    tp = m.tensor_parallel
    assert tp["shards"] == 4 and len(tp["workers"]) == 4
    layer = "model.layers.1."
    axes = {k[len(layer) :]: v for k, v in tp["split"].items() if k.startswith(layer)}
    assert axes == {
        "self_attn.q_proj.weight": 0,  # column-parallel: each shard its heads' output rows
        "self_attn.k_proj.weight": 0,
        "self_attn.v_proj.weight": 0,
        "self_attn.o_proj.weight": 1,  # row-parallel: its heads' input columns, then all-reduce
        "mlp.gate_proj.weight": 0,
        "mlp.up_proj.weight": 0,
        "mlp.down_proj.weight": 1,
    }
    # Each shard's KV cache holds its own key/value heads.
    assert (m.kv_cache["num_q_heads"], m.kv_cache["num_kv_heads"]) == (2, 1)
    # Replicated weights are stored once and read by every shard; split ones once per shard.
    shared = set.intersection(*(set(w) for w in tp["workers"]))
    assert "model.embed_tokens.weight" in shared and "lm_head.weight" in shared
    own = [set(w) - shared for w in tp["workers"]]
    assert all(names and all(n.endswith(f".tp{k}") for n in names) for k, names in enumerate(own))
    assert {p["name"] for p in m.params} == set().union(*map(set, tp["workers"]))
    # 4 shards of the split weights weigh what the whole model's do.
    size = {p["name"]: int(np.prod(p["shape"])) for p in m.params}
    whole_size = sum(int(np.prod(p["shape"])) for p in Manifest.read(whole).params)
    assert sum(size.values()) == whole_size


@pytest.mark.parametrize("shards, session", [(2, "threaded"), (4, "threaded"), (2, "process")])
def test_logits_equal_the_unsharded_artifact(whole, sharded, shards, session):
    one = CompiledModel(whole, max_batch_size=4)
    many = CompiledModel(sharded[shards], max_batch_size=4, disco=session)
    assert type(many.stages[0].session).__name__ == f"{session.capitalize()}Session"
    assert_split_equals_whole(one, many, atol=2e-5, decode_steps=5)


def test_the_sharded_model_generates_what_transformers_does(checkpoint, sharded):
    prompt = [1, 17, 42, 99, 3, 250]
    llm = relaxlm.LLM(str(sharded[4]))
    assert llm.generate([prompt], GREEDY)[0].token_ids == hf_greedy(checkpoint, prompt, 16)


@pytest.mark.parametrize("shards, session", [(2, "threaded"), (4, "threaded"), (2, "process")])
def test_the_engine_batches_and_reuses_prefixes_with_the_same_tokens(
    whole, sharded, shards, session
):
    rng = np.random.default_rng(1)
    prefix = [1, *rng.integers(5, 400, 31).tolist()]  # two full 16-token pages
    prompts = [prefix + rng.integers(5, 400, n).tolist() for n in (3, 9)]
    prompts += [rng.integers(5, 400, 12).tolist()]  # three prompts of different lengths
    oracle = relaxlm.LLM(str(whole), enable_prefix_cache=False)
    want = [oracle.generate([p], GREEDY)[0].token_ids for p in prompts]  # one at a time
    llm = relaxlm.LLM(str(sharded[shards]), disco=session, max_prefill_tokens=32)
    assert [r.token_ids for r in llm.generate(prompts, GREEDY)] == want  # batched
    again = prefix + rng.integers(5, 400, 4).tolist()  # shares the prefix's pages
    before = llm.metrics().prefix_cache_hit_tokens
    got = llm.generate([again], GREEDY)[0].token_ids
    assert llm.metrics().prefix_cache_hit_tokens - before >= 32
    assert got == oracle.generate([again], GREEDY)[0].token_ids


def test_an_int8_kv_cache_in_two_shards_equals_the_whole_with_one(checkpoint, tmp_path):
    """--kv-cache-dtype reaches the shards (each quantizes its own heads' rows, a scale per
    token and head, as the whole model does): the manifest says so and the logits agree."""
    options = {"progress": False, "kv_cache_dtype": "int8"}
    whole = relaxlm.compile(checkpoint, output=tmp_path / "whole", **options)
    two = relaxlm.compile(checkpoint, output=tmp_path / "tp2", tensor_parallel=2, **options)
    kv = Manifest.read(two).kv_cache
    assert kv["page_dtype"] == "int8" and kv["quant"] == Manifest.read(whole).kv_cache["quant"]
    one, many = CompiledModel(whole, max_batch_size=4), CompiledModel(two, max_batch_size=4)
    worst = assert_split_equals_whole(one, many, atol=1e-3, decode_steps=5)
    print(f"int8 KV cache, 2 shards vs whole: max |diff| {worst:.2e}")


def test_a_qwen2_with_biases_in_two_shards_equals_the_whole(tmp_path):
    ckpt = make_model(tmp_path / "qwen2", "Qwen2ForCausalLM", seed=5, tokenizer="bpe", **GQA)
    whole = relaxlm.compile(ckpt, output=tmp_path / "whole", progress=False)
    two = relaxlm.compile(ckpt, output=tmp_path / "tp2", progress=False, tensor_parallel=2)
    assert "model.layers.0.self_attn.q_proj.bias" in Manifest.read(two).tensor_parallel["split"]
    one, many = CompiledModel(whole), CompiledModel(two)
    ids = [1, 40, 41, 300, 7, 8, 9]
    for m in (one, many):
        m.add_sequence(0)
    np.testing.assert_allclose(many.prefill([0], [ids]), one.prefill([0], [ids]), atol=2e-5)
    for token in (11, 12, 13):
        np.testing.assert_allclose(many.decode([0], [token]), one.decode([0], [token]), atol=2e-5)


def test_the_cli_runs_and_inspects_a_sharded_artifact(checkpoint, sharded, capsys):
    assert main(["inspect", str(sharded[2])]) == 0
    out = capsys.readouterr().out
    assert "tensor parallel" in out and "2 shards" in out and "mlp.down_proj.weight columns" in out
    want = relaxlm.LLM(str(sharded[2])).generate(
        ["a b"], SamplingParams(max_tokens=5, temperature=0)
    )
    options = ["--raw", "--prompt", "a b", "--max-tokens", "5", "--temperature", "0"]
    assert main(["run", str(sharded[2]), *options]) == 0  # no flag: the manifest says
    assert capsys.readouterr().out.strip() == want[0].text.strip()
    # A checkpoint with the flag: compiled into the cache in 2 shards, the same answer.
    assert main(["run", str(checkpoint), "--tensor-parallel", "2", *options]) == 0
    assert capsys.readouterr().out.strip() == want[0].text.strip()


def test_refusals_are_one_clear_error(checkpoint, whole, sharded, tmp_path, capsys):
    def compile_error(*extra, model=checkpoint) -> str:
        code = main(["compile", str(model), "-o", str(tmp_path / "x"), *extra])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and not (tmp_path / "x").exists(), err
        return err

    err = compile_error("--tensor-parallel", "3")
    assert (
        "num_attention_heads 8, num_key_value_heads 4, intermediate_size 128 not divisible" in err
    )
    err = compile_error("--tensor-parallel", "2", "--device-map", "cpu:0:0,cpu:1:1")
    assert "cannot be combined with --device-map / --gpu-layers" in err
    from relaxlm.testing.llama_gguf import write_llama_gguf

    gguf = write_llama_gguf(checkpoint, tmp_path / "m.gguf")
    assert "GGUF files" in compile_error("--tensor-parallel", "2", model=gguf)
    phi3 = make_model(tmp_path / "phi3", "Phi3ForCausalLM", seed=1)
    err = compile_error("--tensor-parallel", "2", model=phi3)
    assert "Phi3ForCausalLM cannot be split across shards" in err
    with pytest.raises(RelaxlmError, match="disco='process' runs tensor-parallel artifacts"):
        CompiledModel(whole, disco="process")
    with pytest.raises(RelaxlmError, match="is not a Disco session kind"):
        CompiledModel(sharded[2], disco="mpi")
    with pytest.raises(RelaxlmError, match="in 2 shard"):
        relaxlm.LLM(str(sharded[2]), tensor_parallel=4)


def test_a_damaged_shard_plan_is_refused_at_load(sharded, tmp_path):
    copy = tmp_path / "artifact"
    shutil.copytree(sharded[2], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["tensor_parallel"]["workers"][1].append("nope.weight.tp1")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RelaxlmError, match="damaged manifest.*shard 1 takes parameters"):
        CompiledModel(copy)
    del manifest["tensor_parallel"]["workers"][1]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RelaxlmError, match="lists 1 workers for 2"):
        CompiledModel(copy)
