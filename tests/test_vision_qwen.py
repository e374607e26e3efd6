"""Qwen2.5-VL against transformers: pixel values and patch grids, M-RoPE positions, the vision
tower's features (window and full attention), logits through image+text prefill and decode,
and greedy tokens."""

import numpy as np
import pytest
import torch
import transformers
from test_vision import _image, _png_url

from relaxlm.compiler.pipeline import compile_model
from relaxlm.errors import RelaxlmError
from relaxlm.runtime.model import CompiledModel
from relaxlm.runtime.vision_qwen import QwenImageEncoder, mrope_positions, smart_resize
from relaxlm.testing.tiny_vlm import QWEN_VL_TOKENS, make_qwen2_5_vl_model

# (width, height), odd sizes: landscape, portrait (windows padded on the right), near-square,
# tiny (scaled up to min_pixels), large (scaled down to max_pixels).
SIZES = [(50, 31), (23, 64), (45, 43), (9, 13), (101, 87)]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """(checkpoint folder, CompiledModel, QwenImageEncoder, transformers model, HF processor)."""
    folder = make_qwen2_5_vl_model(tmp_path_factory.mktemp("qwen_vl"), seed=3)
    artifact = compile_model(folder, tmp_path_factory.mktemp("qwen_vl") / "art", progress=False)
    model = CompiledModel(artifact, max_total_tokens=1024)
    hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(folder).eval()
    processor = transformers.Qwen2VLImageProcessorPil.from_pretrained(folder)
    return folder, model, QwenImageEncoder(model), hf, processor


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_preprocessing_equals_qwen2vl_image_processor(qwen, mode):
    _, _, encoder, _, processor = qwen
    for size in SIZES:
        image = _image(*size, mode, seed=sum(size))
        ours = encoder.processor(image)
        theirs = processor(images=image, return_tensors="np")
        pixels = theirs["pixel_values"]
        assert tuple(theirs["image_grid_thw"][0]) == ours.grid
        assert ours.patches.shape == pixels.shape
        diff = float(np.abs(ours.patches - pixels).max())
        print(f"{mode} {size}: grid {ours.grid}, max |pixel diff| {diff:.1e}")
        assert diff <= 1e-5


def test_smart_resize_bounds_and_bad_aspect():
    assert smart_resize(31, 50, 8, 256, 4096) == (32, 48)
    h, w = smart_resize(870, 1010, 8, 256, 4096)
    assert h * w <= 4096 and h % 8 == w % 8 == 0
    with pytest.raises(RelaxlmError, match="aspect ratio"):
        smart_resize(1, 300, 8, 256, 4096)


def _prompt(encoder, images, text_ids=(1, 57, 102, 250)) -> list[int]:
    """Text, then per image `<|vision_start|>`, its image tokens, `<|vision_end|>` and a
    word; then more text."""
    start, end = encoder.image_token_id - 3, encoder.image_token_id - 2
    ids = list(text_ids[:2])
    for k, image in enumerate(images):
        ids += [start, *[encoder.image_token_id] * encoder.num_tokens(image), end, 40 + k]
    return ids + list(text_ids[2:])


def _mm_types(prompt, image_token_id):
    return torch.tensor([[int(t == image_token_id) for t in prompt]])


def test_vision_token_ids_are_the_tokenizers(qwen):
    folder, _, encoder, _, _ = qwen
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tokenizer.convert_tokens_to_ids(list(QWEN_VL_TOKENS))
    assert ids[-1] == encoder.image_token_id
    assert ids[0] == encoder.image_token_id - 3 and ids[1] == encoder.image_token_id - 2


def test_mrope_positions_equal_transformers(qwen):
    _, _, encoder, hf, _ = qwen
    images = [encoder.image(_image(w, h, "RGB", seed=w)) for w, h in [(50, 31), (23, 64)]]
    prompt = _prompt(encoder, images)
    grids = [image.grid for image in images]
    ours, delta = mrope_positions(prompt, encoder.image_token_id, grids, encoder.merge)
    theirs, their_delta = hf.model.get_rope_index(
        torch.tensor([prompt]),
        _mm_types(prompt, encoder.image_token_id),
        image_grid_thw=torch.tensor(grids),
    )
    np.testing.assert_array_equal(ours, theirs[:, 0].numpy())
    assert delta == int(their_delta) < 0
    shifted, _ = encoder.positions(prompt, images)
    # Text after the last image sits at its cache position.
    assert shifted[:, -1].tolist() == [len(prompt) - 1] * 3


def test_tower_features_equal_transformers(qwen):
    _, _, encoder, hf, processor = qwen
    sources = [_image(w, h, "RGB", seed=w + h) for w, h in SIZES]
    images = [encoder.image(s) for s in sources]
    ours = encoder.features(images)
    inputs = processor(images=sources, return_tensors="pt")
    with torch.no_grad():
        theirs = hf.model.get_image_features(
            inputs["pixel_values"], inputs["image_grid_thw"]
        ).pooler_output
    for size, a, b in zip(SIZES, ours, theirs, strict=True):
        b = b.numpy()
        diff, scale = float(np.abs(a - b).max()), float(np.abs(b).max())
        print(f"{size}: {len(b)} tokens, max |diff| {diff:.2e} (max |feature| {scale:.1f})")
        assert a.shape == b.shape
        assert diff <= 2e-5 * scale


def test_tower_attends_within_windows_and_whole_images(qwen):
    """A patch's change reaches every token of its image (the full-attention blocks, both
    ways), and no token of another image."""
    _, _, encoder, _, _ = qwen
    a, b = encoder.image(_image(64, 64, "RGB", seed=1)), encoder.image(_image(32, 40, "RGB", 2))
    before = encoder.features([a, b])
    last = a.patches.copy()
    last[-1] += 1.0  # the bottom-right patch, in the last window
    after = encoder.features([type(a)(last, a.grid), b])
    moved = np.abs(after[0] - before[0]).max(axis=-1)
    assert moved[0] > 1e-4 and moved.min() > 0  # the first token, in another window, moved
    np.testing.assert_array_equal(after[1], before[1])


def _ours(model, encoder, prompt, images, steps: int):
    """Logits after the image+text prefill, then after each greedy decode step; the tokens."""
    seq = 5
    model.add_sequence(seq)
    try:
        embeds = encoder.embeddings(prompt, encoder.features(images) if images else [])
        positions, _ = encoder.positions(prompt, images)
        rows = [encoder.prefill_embeddings([seq], [embeds], [positions])[0]]
        tokens = [int(rows[-1].argmax())]
        for _ in range(steps - 1):
            rows.append(model.decode([seq], [tokens[-1]])[0])
            tokens.append(int(rows[-1].argmax()))
    finally:
        model.remove_sequence(seq)
    return np.stack(rows), tokens


@pytest.mark.parametrize("sizes", [[(50, 31)], [(23, 64)], [(45, 43), (101, 87)], []])
def test_logits_and_greedy_tokens_equal_transformers(qwen, sizes):
    _, model, encoder, hf, processor = qwen
    sources = [_image(w, h, "RGB", seed=w * h) for w, h in sizes]
    images = [encoder.image(s) for s in sources]
    prompt = _prompt(encoder, images)
    ours, tokens = _ours(model, encoder, prompt, images, 16)
    _assert_logits_equal(hf, processor, ours, prompt, tokens, sources, encoder, f"{sizes}")
    assert tokens == _hf_greedy(hf, processor, prompt, sources, encoder.image_token_id)
    assert len(set(tokens)) >= 3


def _hf_images(processor, images: list) -> dict:
    """transformers' image inputs for `images` (none for a text-only prompt)."""
    if not images:
        return {}
    inputs = processor(images=images, return_tensors="pt")
    return {"pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"]}


def _assert_logits_equal(hf, processor, ours, prompt, tokens, images, encoder, label: str):
    """Our rows (after the prefill, then each decode step) equal transformers' forward over the
    prompt and the tokens we generated."""
    full = prompt + tokens[:-1]
    with torch.no_grad():
        theirs = hf(
            input_ids=torch.tensor([full]),
            mm_token_type_ids=_mm_types(full, encoder.image_token_id),
            **_hf_images(processor, images),
        ).logits[0, len(prompt) - 1 :]
    theirs = theirs.numpy()
    diff = float(np.abs(ours - theirs).max())
    print(f"{label}: {len(prompt)} prompt tokens, max |logit diff| {diff:.2e}")
    assert diff <= 1e-4 * max(1.0, float(np.abs(theirs).max()))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_artifacts_follow_transformers(qwen, tmp_path, dtype):
    """float16 / bfloat16 Qwen2.5-VL (tower, merger and trunk in that dtype) against
    transformers run in the same dtype, after the image+text prefill and three decode steps,
    within the text models' tolerance (relaxlm/testing/parity.py)."""
    from relaxlm.testing.parity import TOLERANCE, logit_error

    folder, _, _, _, processor = qwen
    artifact = compile_model(folder, tmp_path / "art", dtype=dtype, progress=False)
    model = CompiledModel(artifact, max_total_tokens=256)
    encoder = QwenImageEncoder(model)
    source = _image(40, 30, "RGB", seed=101)
    image = encoder.image(source)
    prompt = _prompt(encoder, [image])
    ours, tokens = _ours(model, encoder, prompt, [image], 4)
    torch_dtype = getattr(torch, dtype)
    hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch_dtype)
    full = prompt + tokens[:-1]
    inputs = _hf_images(processor, [source])
    with torch.no_grad():
        theirs = hf.eval()(
            input_ids=torch.tensor([full]),
            mm_token_type_ids=_mm_types(full, encoder.image_token_id),
            pixel_values=inputs["pixel_values"].to(torch_dtype),
            image_grid_thw=inputs["image_grid_thw"],
        ).logits[0, len(prompt) - 1 :]
    error = logit_error(ours, theirs.float().numpy())
    print(f"{dtype}: logit error {error:.2e} (tolerance {TOLERANCE[dtype]})")
    assert error <= TOLERANCE[dtype]


def test_text_prefill_equals_prefill_from_embeddings(qwen):
    """The text-only `prefill` entry (cache positions on all three axes) gives the logits of
    `prefill_embeds` with M-RoPE positions of the same text."""
    _, model, encoder, _, _ = qwen
    prompt = [1, 57, 102, 250, 31, 77, 12]
    ours, _ = _ours(model, encoder, prompt, [], 1)
    model.add_sequence(9)
    try:
        plain = model.prefill([9], [prompt])[0]
    finally:
        model.remove_sequence(9)
    np.testing.assert_allclose(plain, ours[0], atol=1e-5)


def test_wrong_image_tokens_are_one_clear_error(qwen):
    _, _, encoder, _, _ = qwen
    image = encoder.image(_image(50, 31, "RGB", seed=0))
    prompt = _prompt(encoder, [image])
    with pytest.raises(RelaxlmError, match="image tokens but 2 images need"):
        encoder.embeddings(prompt, encoder.features([image, image]))
    with pytest.raises(RelaxlmError, match="runs of image tokens for 2 images"):
        encoder.positions(prompt, [image, image])


# -- the SDK --------------------------------------------------------------------------------

GREEDY = {"max_tokens": 16, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def llm(qwen):
    import relaxlm

    return relaxlm.LLM(qwen[1].folder, kv_cache_tokens=1024)


def _hf_greedy(hf, processor, prompt: list[int], images: list, image_token_id: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            mm_token_type_ids=_mm_types(prompt, image_token_id),
            **_hf_images(processor, images),
            do_sample=False,
            max_new_tokens=16,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def test_chat_with_image_parts_equals_transformers(qwen, llm):
    """LLM.chat with OpenAI image_url parts: the chat template's text with each image's
    tokens expanded, and transformers' greedy tokens."""
    import relaxlm

    folder, _, encoder, hf, processor = qwen
    images = [_image(45, 30, "RGB", seed=11), _image(30, 71, "RGBA", seed=12)]
    parts = [
        {"type": "text", "text": "Compare "},
        {"type": "image_url", "image_url": {"url": _png_url(images[0])}},
        {"type": "text", "text": "with "},
        {"type": "image_url", "image_url": {"url": _png_url(images[1])}},
    ]
    result = llm.chat([{"role": "user", "content": parts}], relaxlm.SamplingParams(**GREEDY))
    hf_parts = [{"type": "image"} if p["type"] == "image_url" else p for p in parts]
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": hf_parts}], tokenize=False, add_generation_prompt=True
    )
    counts = [encoder.num_tokens(encoder.image(image)) for image in images]
    ids = encoder.expand(tokenizer(text, add_special_tokens=False)["input_ids"], counts)
    assert result.prompt_token_ids == ids
    assert result.token_ids == _hf_greedy(hf, processor, ids, images, encoder.image_token_id)


def test_generate_with_images_and_the_prefix_cache(qwen, llm):
    """LLM.generate({"prompt", "images"}): transformers' tokens; the same request again reuses
    its cached pages and gives the same tokens; an image of another size (another M-RoPE
    shift) behind the same text reuses nothing and still equals transformers."""
    import relaxlm

    _, _, encoder, hf, processor = qwen
    params = relaxlm.SamplingParams(**GREEDY)
    # Text first: its pages come before the image's, at positions shifted by the image's size.
    prompt = (
        "Here is a picture; read it well, so that the text before it fills a few pages of the "
        "cache. <|vision_start|><|image_pad|><|vision_end|> Describe it in a sentence."
    )

    def run(image) -> tuple[int, list[int], list[int]]:
        before = llm.metrics().prefix_cache_hit_tokens
        out = llm.generate({"prompt": prompt, "images": [image]}, params)[0]
        hits = llm.metrics().prefix_cache_hit_tokens - before
        return hits, out.prompt_token_ids, out.token_ids

    a, b = _image(64, 40, "RGB", seed=21), _image(40, 90, "RGB", seed=22)
    first_hits, ids, first = run(a)
    start = ids.index(encoder.vision_start_id)
    assert start > 2 * llm.model.page_size and ids[start + 1] == encoder.image_token_id
    assert first == _hf_greedy(hf, processor, ids, [a], encoder.image_token_id)
    again_hits, _, again = run(a)
    assert again_hits > 0 and again == first
    other_hits, other_ids, other = run(b)
    print(f"hits: {first_hits}, {again_hits}, {other_hits}; tokens {first} {other}")
    assert other_hits == 0  # the text's pages too: they were rotated at another shift
    assert other == _hf_greedy(hf, processor, other_ids, [b], encoder.image_token_id)
    # The same text without the image sits at unshifted positions: none of the image prompts'
    # pages serve it, and its own serve it again (the plain prompts' cache key).
    text = prompt.split("<|vision_start|>")[0]
    runs = []
    for _ in range(2):
        before = llm.metrics().prefix_cache_hit_tokens
        tokens = llm.generate(text, params)[0].token_ids
        runs.append((llm.metrics().prefix_cache_hit_tokens - before, tokens))
    assert runs[0][0] == 0 and runs[1][0] > 0 and runs[0][1] == runs[1][1]


def test_chunked_prefill_beside_a_text_request_equals_transformers(qwen):
    """Prompts cut into 16-token prefill chunks, an image prompt and a text-only one submitted
    together: each chunk takes its own M-RoPE positions, and both equal transformers."""
    import relaxlm

    _, model, encoder, hf, processor = qwen
    llm = relaxlm.LLM(model.folder, kv_cache_tokens=1024, max_prefill_tokens=16)
    images = [_image(50, 31, "RGB", seed=41), _image(23, 64, "L", seed=42)]
    with_images = {
        "prompt": "one <|vision_start|><|image_pad|><|vision_end|> two "
        "<|vision_start|><|image_pad|><|vision_end|> three",
        "images": images,
    }
    text = "a text-only prompt, long enough to take a few chunks of sixteen tokens each"
    out = llm.generate([with_images, text], relaxlm.SamplingParams(**GREEDY))
    ids = out[0].prompt_token_ids
    assert len(ids) > 3 * 16
    assert out[0].token_ids == _hf_greedy(hf, processor, ids, images, encoder.image_token_id)
    text_ids = out[1].prompt_token_ids
    with torch.no_grad():
        theirs = hf.generate(
            torch.tensor([text_ids]),
            attention_mask=torch.ones(1, len(text_ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=16,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(text_ids) :].tolist()
    assert out[1].token_ids == theirs


def test_openai_and_mcp_clients_get_the_sdk_answer(qwen, llm):
    """The server with the official openai client: a base64 image part gives LLM.chat's
    tokens and prompt length; the official MCP client's `chat` tool gives the same text."""
    import asyncio

    import openai
    from mcp import Client

    import relaxlm
    from relaxlm.server.app import ServerOptions, create_app
    from relaxlm.server.background import BackgroundServer

    url = _png_url(_image(61, 22, "RGB", seed=31))
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": "and?"},
            ],
        }
    ]
    expected = llm.chat(messages, relaxlm.SamplingParams(max_tokens=12, temperature=0.0))

    async def mcp_chat(url: str):
        async with Client(f"{url}/mcp") as mcp:
            arguments = {"messages": messages, "max_tokens": 12, "temperature": 0}
            return await mcp.call_tool("chat", arguments)

    options = ServerOptions(served_model_name="qwen", mcp=True)
    with BackgroundServer(create_app(llm, options)) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        answer = client.chat.completions.create(
            model="qwen", messages=messages, max_tokens=12, temperature=0
        )
        tool = asyncio.run(mcp_chat(server.url))
    assert not tool.is_error and tool.content[0].text == expected.text
    assert answer.choices[0].message.content == expected.text
    assert answer.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert answer.usage.completion_tokens == len(expected.token_ids) == 12


def test_cli_run_with_image_answers_as_chat(llm, tmp_path):
    from test_vision import assert_run_with_image_answers_as_chat

    path = tmp_path / "picture.png"
    _image(37, 52, "RGB", seed=41).save(path)
    assert_run_with_image_answers_as_chat(llm, path)


# -- Qwen2-VL: the same graph with LayerNorm, fc1/fc2 blocks and no windows ------------------


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    """(CompiledModel, QwenImageEncoder, transformers model, HF processor) of a Qwen2-VL."""
    folder = make_qwen2_5_vl_model(tmp_path_factory.mktemp("qwen2_vl"), seed=4, qwen2=True)
    artifact = compile_model(folder, tmp_path_factory.mktemp("qwen2_vl") / "art", progress=False)
    model = CompiledModel(artifact, max_total_tokens=1024)
    hf = transformers.Qwen2VLForConditionalGeneration.from_pretrained(folder).eval()
    processor = transformers.Qwen2VLImageProcessorPil.from_pretrained(folder)
    return model, QwenImageEncoder(model), hf, processor


def test_qwen2_vl_tower_equals_transformers(qwen2):
    _, encoder, hf, processor = qwen2
    sources = [_image(w, h, "RGB", seed=w + h) for w, h in SIZES[:3]]
    ours = encoder.features([encoder.image(s) for s in sources])
    inputs = processor(images=sources, return_tensors="pt")
    with torch.no_grad():
        theirs = hf.model.get_image_features(
            inputs["pixel_values"], inputs["image_grid_thw"]
        ).pooler_output
    for size, a, b in zip(SIZES[:3], ours, theirs, strict=True):
        b = b.numpy()
        diff, scale = float(np.abs(a - b).max()), float(np.abs(b).max())
        print(f"Qwen2-VL {size}: {len(b)} tokens, max |diff| {diff:.2e} (max |f| {scale:.1f})")
        assert a.shape == b.shape
        assert diff <= 2e-5 * scale


@pytest.mark.parametrize("sizes", [[(23, 64)], [(50, 31), (45, 43)]])
def test_qwen2_vl_logits_and_greedy_tokens_equal_transformers(qwen2, sizes):
    model, encoder, hf, processor = qwen2
    sources = [_image(w, h, "RGB", seed=w * h) for w, h in sizes]
    images = [encoder.image(s) for s in sources]
    prompt = _prompt(encoder, images)
    ours, tokens = _ours(model, encoder, prompt, images, 16)
    _assert_logits_equal(hf, processor, ours, prompt, tokens, sources, encoder, f"Qwen2-VL {sizes}")
    assert tokens == _hf_greedy(hf, processor, prompt, sources, encoder.image_token_id)
    assert len(set(tokens)) >= 3


def test_transformers_5_tree_loads(qwen, tmp_path):
    """Tensors named as transformers 5's module tree (`model.visual.*`,
    `model.language_model.*`) bind too (the loader checks both directions)."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from relaxlm.frontends import export, load_checkpoint

    folder = shutil.copytree(qwen[0], tmp_path / "nested")
    tensors = load_file(folder / "model.safetensors")

    def nested(name: str) -> str:
        if name.startswith("visual."):
            return "model." + name
        return name.replace("model.", "model.language_model.", 1)

    renamed = {nested(n): t for n, t in tensors.items()}
    save_file(renamed, folder / "model.safetensors", metadata={"format": "pt"})
    names = export(load_checkpoint(folder)).param_names
    assert "model.visual.merger.ln_q.weight" in names
    assert "model.language_model.embed_tokens.weight" in names


@pytest.mark.parametrize(
    ("file", "path", "value", "message"),
    [
        ("config.json", ["text_config", "rope_parameters", "mrope_section"], [2, 3, 2], "sum"),
        ("config.json", ["vision_config", "fullatt_block_indexes"], [1, 9], "outside"),
        ("config.json", ["vision_config", "window_size"], 20, "not a multiple"),
        ("preprocessor_config.json", ["patch_size"], 8, "differs from the vision tower"),
    ],
)
def test_bad_config_is_one_clear_error(qwen, tmp_path, file, path, value, message):
    import json
    import shutil

    from relaxlm.frontends import export, load_checkpoint

    folder = shutil.copytree(qwen[0], tmp_path / "bad")
    raw = json.loads((folder / file).read_text())
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    (folder / file).write_text(json.dumps(raw))
    with pytest.raises(RelaxlmError, match=message):
        export(load_checkpoint(folder))
