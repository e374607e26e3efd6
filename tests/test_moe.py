"""Mixture-of-experts models (Mixtral, Qwen3-MoE) against transformers, and how experts are
stored and computed: stacked per projection, only the routed experts' weights read."""

import json
import shutil

import numpy as np
import pytest
import torch
import tvm
from hf_models import hf_greedy, hf_logits, load_hf_model
from safetensors.numpy import load_file
from tvm import relax

import relaxlm
from relaxlm.errors import RelaxlmError
from relaxlm.frontends import export, load_checkpoint

MOE_CASES = ["mixtral", "qwen3_moe", "qwen3_moe_dense_layer"]  # in PARITY_CASES
PREFILL, DECODE = 12, 12


def _token_ids(vocab: int, n: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return [1] + rng.integers(5, vocab, n - 1).tolist()


@pytest.mark.parametrize("case", MOE_CASES)
def test_moe_logits_equal_transformers(case, checkpoints, compiled):
    llm = compiled(case)
    ids = _token_ids(llm.model.vocab_size, PREFILL + DECODE, seed=10)
    ours = llm.score(ids, prefill=PREFILL)
    ref = hf_logits(checkpoints(case), ids, PREFILL)
    assert ours.shape == ref.shape == (DECODE + 1, llm.model.vocab_size)
    err = np.abs(ours - ref).max()
    assert err <= 1e-3 * np.abs(ref).max(), f"max abs error {err} vs {np.abs(ref).max()}"


@pytest.mark.parametrize("case", MOE_CASES)
def test_moe_greedy_batch_equals_transformers(case, checkpoints, compiled):
    """Two prompts decoded together: each decode step routes two tokens through the experts."""
    llm = compiled(case)
    prompts = [_token_ids(llm.model.vocab_size, n, seed=s) for n, s in ((8, 11), (5, 12))]
    params = relaxlm.SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    results = llm.generate(prompts, params)
    for prompt, result in zip(prompts, results, strict=True):
        assert result.token_ids == hf_greedy(checkpoints(case), prompt, 16)


@pytest.mark.parametrize("case", MOE_CASES)
def test_test_tokens_are_routed_to_most_experts(case, checkpoints):
    """The parity tests mean something: their tokens spread over the experts in every layer."""
    model = load_hf_model(checkpoints(case))
    ids = torch.tensor([_token_ids(model.config.vocab_size, PREFILL + DECODE, seed=10)])
    with torch.no_grad():
        router_logits = model(ids, output_router_logits=True).router_logits
    top_k = model.config.num_experts_per_tok
    for logits in router_logits:
        used = set(torch.topk(logits, top_k, dim=-1).indices.flatten().tolist())
        assert len(used) >= 6, used


def test_experts_bind_stacked_by_checkpoint_names(checkpoints):
    folder = checkpoints("mixtral")
    ckpt = load_checkpoint(folder)
    name = "model.layers.1.block_sparse_moe.experts.w2.weight"
    assert ckpt.tensors[name].shape == (8, 64, 128)
    assert not any(".experts.0." in n for n in ckpt.tensors)  # per-expert names are folded
    saved = load_file(folder / "model.safetensors")
    per_expert = [saved[f"model.layers.1.block_sparse_moe.experts.{i}.w2.weight"] for i in range(8)]
    np.testing.assert_array_equal(ckpt.read(name), np.stack(per_expert))
    assert name in export(ckpt).param_names


@pytest.mark.parametrize("case", ["mixtral", "qwen3_moe"])
def test_only_routed_experts_are_computed(case, checkpoints):
    """Every use of a stacked expert weight [E, N, K] is a gather kernel whose output holds
    top_k rows per token, [tokens, top_k, N]: no expert runs on a token not routed to it."""
    exported = export(load_checkpoint(checkpoints(case)))
    top_k = exported.config["num_experts_per_tok"]
    experts = {i for i, n in enumerate(exported.param_names) if ".experts." in n}
    assert experts
    for gvar, func in exported.mod.functions_items():
        if gvar.name_hint not in ("prefill", "decode"):
            continue
        params = func.params[-1]
        weights, uses = set(), 0
        for block in func.body.blocks:
            for binding in block.bindings:
                value = binding.value
                if isinstance(value, relax.TupleGetItem) and value.tuple_value.same_as(params):
                    if value.index in experts:
                        weights.add(binding.var)
                    continue
                if not isinstance(value, relax.Call):
                    continue
                call_tir = value.op.same_as(tvm.ir.Op.get("relax.call_tir"))
                args = list(value.args[1].fields) if call_tir else list(value.args)
                if not any(any(a.same_as(w) for w in weights) for a in args):
                    continue
                assert call_tir, value
                uses += 1
                assert value.args[0].name_hint.startswith("expert_matmul"), value
                tokens, slots, _ = value.ty.shape
                assert int(slots) == top_k, value.ty
        assert len(weights) == len(experts) and uses == len(experts)


def _edited_copy(src, dst, edit):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(edit(config)))
    return dst


@pytest.mark.parametrize(
    ("case", "edit", "named"),
    [
        ("mixtral", lambda c: {**c, "hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ("mixtral", lambda c: {**c, "num_experts_per_tok": 9}, "num_experts_per_tok 9"),
        (
            "qwen3_moe",
            lambda c: {**c, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}},
            "rope type 'yarn'",
        ),
    ],
)
def test_unimplemented_moe_config_fails_at_compile_time(case, edit, named, checkpoints, tmp_path):
    bad = _edited_copy(checkpoints(case), tmp_path / "bad", edit)
    with pytest.raises(RelaxlmError, match=named):
        relaxlm.compile(bad, output=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
