"""LoRA adapters served unmerged from adapter slots, against PEFT's own merge (merge_and_unload)."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import openai
import peft
import pytest
import requests
import torch
import transformers
from hf_models import hf_logits
from safetensors.numpy import load_file, save_file
from test_cli import assert_clean_error, relaxlm_cli
from test_quantization import _dequantized_checkpoint

import relaxlm
from relaxlm.frontends.checkpoint import TOKENIZER_FILES
from relaxlm.runtime.scheduler import PrefixCache
from relaxlm.testing.servers import relaxlm_serve

PREFILL = 10
SLOTS, RANK = 2, 8
# Adapter "a" adapts attention and the MLP's outer layers, "b" (rsLoRA, one module of rank 2, r
# 8 = the slots' rank) other layers too, so their slots differ in which layers they fill.
A_TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]
B_TARGETS = ["q_proj", "k_proj", "up_proj", "down_proj"]
IGNORE_EOS = {"ignore_eos": True}  # relaxlm's (and vLLM's) extension of the request
B_OPTIONS = {"r": 8, "use_rslora": True, "rank_pattern": {"layers.1.self_attn.q_proj": 2}}


def _hf_model(folder: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def _make_adapter(base: Path, out: Path, seed: int, targets: list[str], **options) -> Path:
    """A random PEFT LoRA adapter for `base` (B random too, so it changes the logits)."""
    torch.manual_seed(seed)
    config = {"r": 4, "lora_alpha": 8, **options}
    lora = peft.LoraConfig(target_modules=targets, init_lora_weights=False, **config)
    peft.get_peft_model(_hf_model(base), lora).save_pretrained(out)
    return out


def _peft_merged(base: Path, adapter: Path, out: Path) -> Path:
    model = peft.PeftModel.from_pretrained(_hf_model(base), adapter).merge_and_unload()
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copyfile(base / name, out / name)
    return out


def _token_ids(n: int, seed: int = 0) -> list[int]:
    return [1] + np.random.default_rng(seed).integers(5, 400, n - 1).tolist()


def _max_error(ours: np.ndarray, ref: np.ndarray) -> float:
    """The largest difference, as a fraction of the reference's largest |logit|."""
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def adapters(checkpoints, tmp_path_factory):
    """The tiny Llama, adapters a and b for it, and PEFT's merge of each."""
    base = checkpoints("llama_gqa")
    root = tmp_path_factory.mktemp("lora-slots")
    a = _make_adapter(base, root / "a", 0, A_TARGETS)
    b = _make_adapter(base, root / "b", 1, B_TARGETS, **B_OPTIONS)
    return {
        "base": base,
        "root": root,
        "a": a,
        "b": b,
        "merged_a": _peft_merged(base, a, root / "merged-a"),
        "merged_b": _peft_merged(base, b, root / "merged-b"),
    }


@pytest.fixture(scope="module")
def llm(adapters):
    """The base compiled with 2 slots of rank 8, both adapters loaded."""
    return relaxlm.LLM(
        str(adapters["base"]),
        lora_slots=SLOTS,
        lora_max_rank=RANK,
        lora_adapters={"a": adapters["a"], "b": adapters["b"]},
    )


def test_logits_with_each_adapter_equal_peft_merged(adapters, llm):
    ids = _token_ids(PREFILL + 10)
    for name in ("a", "b"):
        ref = hf_logits(adapters[f"merged_{name}"], ids, PREFILL)
        err = _max_error(llm.score(ids, PREFILL, lora=name), ref)
        assert err <= 1e-3, (name, err)
    base_ref = hf_logits(adapters["base"], ids, PREFILL)
    assert _max_error(llm.score(ids, PREFILL), base_ref) <= 1e-3  # slot 0: the base alone
    # the adapters matter far beyond the tolerance
    assert _max_error(base_ref, hf_logits(adapters["merged_a"], ids, PREFILL)) > 0.1
    spec = llm.manifest.lora_slots
    assert (spec["slots"], spec["max_rank"]) == (SLOTS, RANK)
    assert len(spec["targets"]) == 2 * 7  # every linear layer of both layers, not lm_head
    assert {a: (x.slot, x.rank) for a, x in llm.loras().items()} == {"a": (1, 4), "b": (2, 8)}
    shown = relaxlm_cli("inspect", llm.artifact).stdout.splitlines()
    (line,) = [row for row in shown if row.startswith("lora slots")]
    assert "2 of rank 8 on 14 layers (down_proj, gate_proj, k_proj, o_proj" in line, line


def test_one_forward_mixing_adapters_equals_each_alone(llm):
    """Three sequences through slots 1, 0 and 2 in one prefill and one decode, and each alone."""
    model = llm.model
    prompts = [_token_ids(7, seed=s) for s in (3, 4, 5)]
    slots, nexts = [1, 0, 2], [11, 12, 13]

    def run(seq_ids, chunks, slot_ids, tokens):
        for s in seq_ids:
            model.add_sequence(s)
        try:
            first = model.prefill(seq_ids, chunks, slots=slot_ids)
            second = model.decode(seq_ids, tokens, slots=slot_ids)
        finally:
            for s in seq_ids:
                model.remove_sequence(s)
        return first, second

    with llm.engine._step_lock:  # the engine's KV cache, between its steps
        ids = [10_001, 10_002, 10_003]
        together = run(ids, prompts, slots, nexts)
        cases = zip(ids, prompts, slots, nexts, strict=True)
        alone = [run([i], [p], [s], [t]) for i, p, s, t in cases]
    for k in range(3):
        for step in range(2):
            err = np.abs(together[step][k] - alone[k][step][0]).max()
            assert err <= 1e-4 * np.abs(alone[k][step][0]).max(), (k, step, err)
    # and they differ: each row went through its own slot
    assert np.abs(together[0][0] - together[0][1]).max() > 0.1 * np.abs(together[0][1]).max()


def test_generate_batches_adapters_and_base(llm):
    prompts = [_token_ids(9, seed=s) for s in (6, 7, 8)]
    params = [
        relaxlm.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, lora=lora)
        for lora in ("a", None, "b")
    ]
    together = [r.token_ids for r in llm.generate(prompts, params)]
    alone = [llm.generate([p], q)[0].token_ids for p, q in zip(prompts, params, strict=True)]
    assert together == alone
    # the same prompt through each adapter: three different continuations
    same = llm.generate([prompts[0]] * 3, params)
    assert len({tuple(r.token_ids) for r in same}) == 3
    assert llm.generate(prompts[0], params[0], lora="b")[0].token_ids == same[2].token_ids


def test_load_and_unload_at_run_time(adapters, llm):
    ids = _token_ids(PREFILL + 6, seed=9)
    ref_b = hf_logits(adapters["merged_b"], ids, PREFILL)
    greedy = relaxlm.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    long_prompt = _token_ids(40, seed=12)  # two full KV pages: cached as a prefix when done
    with_b = llm.generate(long_prompt, greedy, lora="b")[0].token_ids
    llm.unload_lora("b")
    assert list(llm.loras()) == ["a"]
    with pytest.raises(relaxlm.RelaxlmError, match="'b' is not loaded"):
        llm.generate([1, 2, 3], relaxlm.SamplingParams(max_tokens=2), lora="b")
    loaded = llm.load_lora("b-again", adapters["b"])
    assert loaded.slot == 2 and list(llm.loras()) == ["a", "b-again"]
    assert _max_error(llm.score(ids, PREFILL, lora="b-again"), ref_b) <= 1e-3
    assert llm.generate(long_prompt, greedy, lora="b-again")[0].token_ids == with_b
    llm.unload_lora("b-again")
    # slot 2 now holds a: equal to slot 1, and b's cached pages of the prompt are not reused
    llm.load_lora("a-too", adapters["a"])
    assert np.array_equal(llm.score(ids, PREFILL, lora="a-too"), llm.score(ids, PREFILL, lora="a"))
    with_a = llm.generate(long_prompt, greedy, lora="a")[0].token_ids
    assert with_a != with_b
    hits = llm.metrics().prefix_cache_hit_tokens
    assert llm.generate(long_prompt, greedy, lora="a-too")[0].token_ids == with_a
    assert llm.metrics().prefix_cache_hit_tokens == hits  # a-too's K/V are its own
    assert llm.generate(long_prompt, greedy, lora="a")[0].token_ids == with_a
    assert llm.metrics().prefix_cache_hit_tokens > hits  # a's own cached prompt is reused
    llm.unload_lora("a-too")
    llm.load_lora("b", adapters["b"])


def test_an_adapter_in_use_is_not_unloaded(llm):
    """Unloading refuses while a request generates with the adapter (its slot would change
    under it); the request, once aborted, no longer holds it. The unload runs on the engine
    thread between steps, after the request's admission (queued first), before its end."""
    longest = llm.manifest.context_window - 8  # far more steps than the unload waits for
    params = relaxlm.SamplingParams(max_tokens=longest, temperature=0, ignore_eos=True, lora="a")
    request_id = llm.engine.submit(_token_ids(8, seed=13), params, lambda output: None)
    with pytest.raises(relaxlm.RelaxlmError, match="'a' is in use by 1 request"):
        llm.unload_lora("a")
    llm.engine.abort(request_id)
    assert list(llm.loras()) == ["a", "b"]


def test_prefix_cache_keeps_each_adapters_pages_apart():
    """The scheduler's prefix cache (data in, data out): the same tokens under another cache
    key (another adapter's K/V) match nothing."""
    cache = PrefixCache(page_size=4)
    tokens = list(range(12))
    cache.insert(tokens, owner=7, key=3)
    assert cache.match(tokens, 12, key=3) == (7, 12)
    assert cache.match(tokens, 12, key=0) == (None, 0)
    assert cache.new_blocks(tokens, key=5) == 3 and cache.new_blocks(tokens, key=3) == 0
    cache.evict(7)
    assert cache.match(tokens, 12, key=3) == (None, 0)


def _edited(src: Path, dst: Path, config=None, tensors=None) -> Path:
    shutil.copytree(src, dst)
    if config:
        data = json.loads((dst / "adapter_config.json").read_text())
        (dst / "adapter_config.json").write_text(json.dumps({**data, **config}))
    if tensors:
        file = dst / "adapter_model.safetensors"
        save_file({**load_file(file), **tensors}, file)
    return dst


def test_refusals(adapters, llm, compiled, tmp_path):
    base, a = adapters["base"], adapters["a"]
    before = llm.score(_token_ids(8), 8, lora="a")
    llm.unload_lora("b")  # a free slot: the refusals below are the adapters' own
    wide = _make_adapter(base, tmp_path / "wide", 2, ["q_proj"], r=16)
    with pytest.raises(relaxlm.RelaxlmError, match="rank 16, over the slots' most rank 8"):
        llm.load_lora("wide", wide)
    torch.manual_seed(3)  # the logits head (tied to the embeddings: their copy not saved)
    config = peft.LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False)
    head = tmp_path / "head"
    peft.get_peft_model(_hf_model(base), config).save_pretrained(head, save_embedding_layers=False)
    with pytest.raises(relaxlm.RelaxlmError, match="module lm_head, which has no LoRA slot"):
        llm.load_lora("head", head)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    bad = _edited(a, tmp_path / "bad", tensors={key: np.zeros((32, 4), np.float32)})
    with pytest.raises(relaxlm.RelaxlmError, match=r"64 -> 64.*another base model"):
        llm.load_lora("bad", bad)
    assert list(llm.loras()) == ["a"]
    llm.load_lora("b", adapters["b"])
    with pytest.raises(relaxlm.RelaxlmError, match="no free LoRA slot for 'c': all 2"):
        llm.load_lora("c", a)
    with pytest.raises(relaxlm.RelaxlmError, match="named 'a' is loaded already"):
        llm.load_lora("a", a)
    with pytest.raises(relaxlm.RelaxlmError, match="'nope' is not loaded"):
        llm.generate([1, 2], relaxlm.SamplingParams(max_tokens=2), lora="nope")
    assert list(llm.loras()) == ["a", "b"]  # nothing changed by the refusals
    assert np.array_equal(llm.score(_token_ids(8), 8, lora="a"), before)
    plain = compiled("llama_gqa")
    with pytest.raises(relaxlm.RelaxlmError, match="has no LoRA slots"):
        plain.load_lora("a", a)
    with pytest.raises(relaxlm.RelaxlmError, match="has no LoRA slots"):
        plain.generate([1, 2], relaxlm.SamplingParams(max_tokens=2), lora="a")
    with pytest.raises(relaxlm.RelaxlmError, match="without LoRA slots"):
        relaxlm.LLM(str(plain.artifact), lora_slots=2)
    with pytest.raises(relaxlm.RelaxlmError, match="lora_max_rank=0 is invalid"):
        relaxlm.LLM(str(base), lora_slots=1, lora_max_rank=0)
    proc = relaxlm_cli("compile", base, "--lora", f"a={a}", "-o", tmp_path / "out")
    assert_clean_error(proc, "load when the model runs", "--lora-slots K")


def test_q4_base(adapters, tmp_path):
    """A q4 base: its linear weights quantized, the slots in float32. The oracle: PEFT's merge
    of the adapter into the base whose weights are q4's dequantized values."""
    llm = relaxlm.LLM(
        str(adapters["base"]),
        quant="q4",
        lora_slots=1,
        lora_max_rank=RANK,
        lora_adapters={"a": adapters["a"]},
    )
    params = {p["name"]: p for p in llm.manifest.params}
    assert llm.manifest.quantization["scheme"] == "q4"
    assert params["model.layers.0.self_attn.q_proj.lora_A"]["dtype"] == "F32"
    assert "model.layers.0.mlp.down_proj.weight" not in params  # stored as q4 parts
    assert "model.layers.0.mlp.down_proj.weight.q" in params
    dequantized = _dequantized_checkpoint(adapters["base"], tmp_path / "deq", "q4")
    merged = _peft_merged(dequantized, adapters["a"], tmp_path / "merged")
    ids = _token_ids(PREFILL + 8, seed=10)
    ref = hf_logits(merged, ids, PREFILL)
    err = _max_error(llm.score(ids, PREFILL, lora="a"), ref)
    assert err <= 1e-3, err
    assert _max_error(llm.score(ids, PREFILL), hf_logits(dequantized, ids, PREFILL)) <= 1e-3


def test_gpt2_conv1d_slots_equal_peft_merged(checkpoints, tmp_path):
    """GPT-2's projections are Conv1D (weight [in, out]), not nn.Linear: slots on c_attn,
    c_proj and c_fc equal PEFT's merge (its fan_in_fan_out path)."""
    base = checkpoints("gpt2")
    adapter = _make_adapter(base, tmp_path / "a", 0, ["c_attn", "c_proj", "c_fc"])
    merged = _peft_merged(base, adapter, tmp_path / "merged")
    llm = relaxlm.LLM(str(base), lora_slots=1, lora_max_rank=RANK, lora_adapters={"a": adapter})
    assert sorted(llm.manifest.lora_slots["targets"]) == sorted(
        f"transformer.h.{i}.{m}"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    )
    ids = _token_ids(PREFILL + 4, seed=13)
    ref = hf_logits(merged, ids, PREFILL)
    assert _max_error(llm.score(ids, PREFILL, lora="a"), ref) <= 1e-4
    assert _max_error(hf_logits(base, ids, PREFILL), ref) > 0.1


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_slots_follow_transformers(adapters, dtype):
    """Slots in a float16 / bfloat16 artifact: adapter a's logits against transformers running
    PEFT's merged model in the same dtype, within the text models' tolerance; the adapter
    moves them far beyond it."""
    from relaxlm.testing.parity import TOLERANCE, load_reference, logit_error, reference_logits

    llm = relaxlm.LLM(
        str(adapters["base"]),
        dtype=dtype,
        lora_slots=1,
        lora_max_rank=RANK,
        lora_adapters={"a": adapters["a"]},
    )
    ids = _token_ids(PREFILL + 4, seed=12)
    ours = llm.score(ids, PREFILL, lora="a")
    merged = reference_logits(load_reference(adapters["merged_a"], dtype), ids, PREFILL)
    base = reference_logits(load_reference(adapters["base"], dtype), ids, PREFILL)
    error, moved = logit_error(ours, merged), logit_error(base, merged)
    print(f"{dtype}: logit error {error:.2e} (tolerance {TOLERANCE[dtype]}), adapter {moved:.2f}")
    assert error <= TOLERANCE[dtype] < moved


def test_cli_run_and_bench_generate_with_the_named_adapter(adapters, llm):
    """`relaxlm run BASE --lora a=DIR` prints LLM.generate(..., lora="a")'s text; `bench` says
    which adapter it measured; two NAME=DIR adapters are one clear error there."""
    prompt = "an adapter at work"
    params = relaxlm.SamplingParams(max_tokens=8, temperature=0, lora="a")
    want = llm.generate(prompt, params)[0].text
    assert want != llm.generate(prompt, replace(params, lora=None))[0].text
    common = [adapters["base"], "--lora", f"a={adapters['a']}"]
    common += ["--lora-slots", SLOTS, "--lora-max-rank", RANK]  # the fixture's artifact
    run = relaxlm_cli(
        "run", *common, "--prompt", prompt, "--raw", "--max-tokens", 8, "--temperature", 0
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == want + "\n"
    bench = relaxlm_cli(
        "bench", *common, "--prompt-tokens", 8, "--decode-tokens", 4, "--repeats", 1, "--json"
    )
    assert bench.returncode == 0, bench.stderr
    result = json.loads(bench.stdout)
    assert result["lora"] == "a" and result["decode_tok_s"] > 0
    two = relaxlm_cli("run", *common, "--lora", f"b={adapters['b']}", "--prompt", prompt)
    assert_clean_error(two, "generates with one LoRA adapter", "relaxlm serve takes several")


def test_openai_client_picks_adapters_on_a_real_server(adapters, llm):
    """`relaxlm serve BASE --lora a=PATH --lora-slots 2`: the request's `model` picks the
    adapter, /v1/models lists them, and vLLM's load / unload routes change them."""
    params = relaxlm.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompt = _token_ids(9, seed=11)
    want = {name: llm.generate(prompt, params, lora=name)[0].text for name in ("a", "b")}
    want["base"] = llm.generate(prompt, params)[0].text
    assert len(set(want.values())) == 3
    args = [str(adapters["base"]), "--served-model-name", "base", "--lora", f"a={adapters['a']}"]
    args += ["--lora-slots", str(SLOTS), "--lora-max-rank", str(RANK)]
    with relaxlm_serve(*args, timeout=600) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

        def complete(model: str) -> str:
            answer = client.completions.create(
                model=model, prompt=prompt, max_tokens=8, temperature=0, extra_body=IGNORE_EOS
            )
            assert answer.model == model  # the adapter it asked for, as vLLM echoes it
            return answer.choices[0].text

        models = client.models.list().data
        assert [m.id for m in models] == ["base", "a"]
        assert models[1].parent == "base" and models[1].root == str(adapters["a"].resolve())
        assert complete("a") == want["a"] and complete("base") == want["base"]

        def post(route: str, **body) -> requests.Response:  # vLLM's routes, plain HTTP
            return requests.post(f"{url}/v1/{route}", json=body, timeout=60)

        loaded = post("load_lora_adapter", lora_name="b", lora_path=str(adapters["b"]))
        assert loaded.status_code == 200 and "'b' added" in loaded.text
        assert [m.id for m in client.models.list().data] == ["base", "a", "b"]
        assert complete("b") == want["b"]
        chat = client.chat.completions.create(
            model="b", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert chat.model == "b" and chat.choices[0].message.content is not None
        full = post("load_lora_adapter", lora_name="c", lora_path=str(adapters["a"]))
        assert full.status_code == 400 and "no free LoRA slot" in full.json()["error"]["message"]
        assert post("unload_lora_adapter", lora_name="b").status_code == 200
        assert [m.id for m in client.models.list().data] == ["base", "a"]
        with pytest.raises(openai.NotFoundError, match="'b' does not exist"):
            complete("b")
        again = post("unload_lora_adapter", lora_name="b")
        assert again.status_code == 404 and "'b' is not loaded" in again.json()["error"]["message"]
