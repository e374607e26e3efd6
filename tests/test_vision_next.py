"""LLaVA-NeXT ("anyres" tiling) against transformers: tiles and pixel values, image-token
counts, image features, logits through image+text prefill and decode, greedy tokens, and
`LLM.chat` with OpenAI image parts."""

import numpy as np
import pytest
import torch
import transformers
from test_vision import GREEDY, _image, _png_url

from relaxlm.compiler.pipeline import compile_model
from relaxlm.errors import RelaxlmError
from relaxlm.runtime.model import CompiledModel
from relaxlm.runtime.vision import ImageEncoder
from relaxlm.testing.tiny_vlm import make_llava_model

# 28-pixel tiles of 4x4 patches; grids up to 3 tiles long, both ways.
PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]
# (width, height): landscape, portrait, near-square, tiny, wide; odd sizes throughout.
SIZES = [(50, 31), (23, 64), (45, 43), (9, 13), (101, 29)]


@pytest.fixture(scope="module")
def next_model(tmp_path_factory):
    """(checkpoint folder, CompiledModel, ImageEncoder, transformers model, HF processor)."""
    folder = make_llava_model(
        tmp_path_factory.mktemp("llava_next"),
        seed=2,
        image_grid_pinpoints=PINPOINTS,
        text_overrides={"max_position_embeddings": 512},
    )
    artifact = compile_model(folder, tmp_path_factory.mktemp("llava_next") / "art", progress=False)
    model = CompiledModel(artifact, max_total_tokens=1024)
    hf = transformers.LlavaNextForConditionalGeneration.from_pretrained(folder).eval()
    processor = transformers.LlavaNextProcessor(
        image_processor=transformers.AutoImageProcessor.from_pretrained(folder),
        tokenizer=transformers.AutoTokenizer.from_pretrained(folder),
        patch_size=hf.config.vision_config.patch_size,
        vision_feature_select_strategy=hf.config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's class token, as llava-hf's v1.6 processors say
    )
    return folder, model, ImageEncoder(model), hf, processor


def _hf_inputs(processor, text: str, images: list) -> dict:
    return processor(text=text, images=images, return_tensors="pt", add_special_tokens=False)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_tiles_and_token_counts_equal_llava_next_processor(next_model, mode):
    _, _, encoder, _, processor = next_model
    for size in SIZES:
        image = _image(*size, mode, seed=sum(size))
        ours = encoder.tiles(image)
        theirs = processor.image_processor(images=image, return_tensors="np")
        pixels = theirs["pixel_values"][0]
        assert ours.pixels.shape == pixels.shape  # (1 + tiles, 3, 28, 28)
        assert tuple(theirs["image_sizes"][0]) == ours.size == size[::-1]
        diff = float(np.abs(ours.pixels - pixels).max())
        # transformers' processor writes one <image> per image token: its count is the oracle.
        ids = _hf_inputs(processor, "<image>", [image])["input_ids"][0]
        count = int((ids == encoder.image_token_id).sum())
        print(f"{mode} {size}: {len(pixels)} tiles, {count} tokens, max |pixel diff| {diff:.1e}")
        assert diff <= 1e-5
        assert encoder.num_tokens(ours) == count


def test_manifest_describes_the_tiling(next_model):
    _, model, encoder, _, _ = next_model
    vision = model.manifest.vision
    assert vision["processor"] == "llava_next" and vision["image_grid_pinpoints"] == PINPOINTS
    assert vision["patches_per_side"] == 4 and vision["tokens_per_tile"] == 16
    assert "tokens_per_image" not in vision and encoder.tokens_per_image is None


def test_image_features_equal_transformers(next_model):
    _, _, encoder, hf, processor = next_model
    images = [_image(w, h, "RGB", seed=w + h) for w, h in SIZES]
    ours = encoder.features([encoder.tiles(image) for image in images])
    inputs = processor.image_processor(images=images, return_tensors="pt")
    with torch.no_grad():
        theirs = hf.model.get_image_features(
            inputs["pixel_values"],
            inputs["image_sizes"],
            vision_feature_layer=hf.config.vision_feature_layer,
            vision_feature_select_strategy=hf.config.vision_feature_select_strategy,
        ).pooler_output
    for size, a, b in zip(SIZES, ours, theirs, strict=True):
        b = b.numpy()
        diff = float(np.abs(a - b).max())
        scale = float(np.abs(b).max())
        print(f"{size}: {len(b)} features, max |diff| {diff:.2e} (max |feature| {scale:.0f})")
        assert a.shape == b.shape
        assert diff <= 4e-6 * scale  # measured 1.7e-6 at most


def _ours(model, encoder, prompt, tiles, steps: int):
    """Logits after the image+text prefill, then after each greedy decode step; the tokens."""
    seq = 3
    model.add_sequence(seq)
    try:
        embeds = encoder.embeddings(prompt, encoder.features(tiles))
        rows = [encoder.prefill_embeddings([seq], [embeds])[0]]
        tokens = [int(rows[-1].argmax())]
        for _ in range(steps - 1):
            rows.append(model.decode([seq], [tokens[-1]])[0])
            tokens.append(int(rows[-1].argmax()))
    finally:
        model.remove_sequence(seq)
    return np.stack(rows), tokens


@pytest.mark.parametrize("sizes", [[(50, 31)], [(23, 64)], [(101, 29), (33, 47)]])
def test_logits_and_greedy_tokens_equal_transformers(next_model, sizes):
    _, model, encoder, hf, processor = next_model
    images = [_image(w, h, "RGB", seed=w * h) for w, h in sizes]
    text = "a b" + "".join(f" <image> c{i}" for i in range(len(images))) + " what is it"
    inputs = _hf_inputs(processor, text, images)
    prompt = inputs["input_ids"][0].tolist()
    tiles = [encoder.tiles(image) for image in images]
    # Our expansion of one <image> per image equals the HF processor's.
    one_each = [
        t for i, t in enumerate(prompt) if t != encoder.image_token_id or prompt[i - 1] != t
    ]
    assert encoder.expand(one_each, [encoder.num_tokens(t) for t in tiles]) == prompt
    steps = 16
    ours, tokens = _ours(model, encoder, prompt, tiles, steps)
    with torch.no_grad():
        generated = hf.generate(
            **inputs, do_sample=False, max_new_tokens=steps, eos_token_id=None, pad_token_id=0
        )[0, len(prompt) :].tolist()
        full = torch.tensor([prompt + tokens[:-1]])
        theirs = hf(
            input_ids=full, pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]
        ).logits[0, len(prompt) - 1 :]
    theirs = theirs.numpy()
    diff = float(np.abs(ours - theirs).max())
    print(f"{sizes}: {len(prompt)} prompt tokens, max |logit diff| {diff:.2e}")
    assert diff <= 1e-4 * max(1.0, float(np.abs(theirs).max()))
    assert tokens == generated
    assert len(set(tokens)) >= 3


@pytest.fixture(scope="module")
def llm(next_model):
    import relaxlm

    return relaxlm.LLM(next_model[1].folder, kv_cache_tokens=1024)


def test_chat_with_image_parts_equals_transformers(next_model, llm):
    """LLM.chat with OpenAI image_url parts: the prompt transformers' processor builds from the
    chat template's text (its image tokens expanded per image size) and its greedy tokens."""
    import relaxlm

    _, _, _, hf, processor = next_model
    images = [_image(45, 30, "RGB", seed=11), _image(30, 71, "RGBA", seed=12)]
    parts = [
        {"type": "text", "text": "Compare "},
        {"type": "image_url", "image_url": {"url": _png_url(images[0])}},
        {"type": "text", "text": "with "},
        {"type": "image_url", "image_url": {"url": _png_url(images[1])}},
    ]
    result = llm.chat([{"role": "user", "content": parts}], relaxlm.SamplingParams(**GREEDY))
    hf_parts = [{"type": "image"} if p["type"] == "image_url" else p for p in parts]
    text = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": hf_parts}], tokenize=False, add_generation_prompt=True
    )
    inputs = _hf_inputs(processor, text, images)
    assert result.prompt_token_ids == inputs["input_ids"][0].tolist()
    with torch.no_grad():
        theirs = hf.generate(
            **inputs, do_sample=False, max_new_tokens=16, eos_token_id=None, pad_token_id=0
        )[0, inputs["input_ids"].shape[1] :].tolist()
    assert result.token_ids == theirs
    too_many = [{"type": "image_url", "image_url": {"url": _png_url(images[1])}}] * 8
    with pytest.raises(RelaxlmError, match="8 images take 528 tokens \\(66 each\\)"):
        llm.chat([{"role": "user", "content": too_many}])


def test_openai_client_gets_the_sdk_answer(next_model, llm):
    """The server with the official openai client: two images of different shapes, the SDK's
    tokens and prompt length; too many images are one 400."""
    import openai

    import relaxlm
    from relaxlm.server.app import ServerOptions, create_app
    from relaxlm.server.background import BackgroundServer

    urls = [_png_url(_image(61, 22, "RGB", seed=31)), _png_url(_image(17, 40, "LA", seed=32))]
    content = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    messages = [{"role": "user", "content": [*content, {"type": "text", "text": "and?"}]}]
    expected = llm.chat(messages, relaxlm.SamplingParams(max_tokens=12, temperature=0.0))
    with BackgroundServer(create_app(llm, ServerOptions(served_model_name="next"))) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        answer = client.chat.completions.create(
            model="next", messages=messages, max_tokens=12, temperature=0
        )
        with pytest.raises(openai.BadRequestError, match="images take"):
            client.chat.completions.create(
                model="next", messages=[{"role": "user", "content": content * 5}], max_tokens=2
            )
    assert answer.choices[0].message.content == expected.text
    assert answer.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert answer.usage.completion_tokens == len(expected.token_ids) == 12


def _copy(folder, to):
    import shutil

    shutil.copytree(folder, to)
    return to


def test_transformers_4_layout_loads(next_model, tmp_path):
    """llava-hf's v1.6 checkpoints name the tower `vision_tower.vision_model.*` beside a
    top-level `image_newline`: every tensor binds (the loader checks both directions)."""
    from safetensors.numpy import load_file, save_file

    from relaxlm.frontends import export, load_checkpoint

    nested = _copy(next_model[0], tmp_path / "nested")
    tensors = load_file(nested / "model.safetensors")
    renamed = {
        n.replace("vision_tower.", "vision_tower.vision_model.", 1): t for n, t in tensors.items()
    }
    save_file(renamed, nested / "model.safetensors", metadata={"format": "pt"})
    names = export(load_checkpoint(nested)).param_names
    assert "vision_tower.vision_model.embeddings.class_embedding" in names
    assert "image_newline" in names


@pytest.mark.parametrize(
    ("file", "key", "value", "message"),
    [
        ("config.json", "vision_feature_select_strategy", "full", "does not fit LLaVA-NeXT"),
        ("config.json", "image_grid_pinpoints", [[30, 56]], "multiple of the vision tower"),
        ("preprocessor_config.json", "image_grid_pinpoints", [[28, 56]], "differ from"),
    ],
)
def test_bad_tiling_config_is_one_clear_error(next_model, tmp_path, file, key, value, message):
    import json

    from relaxlm.frontends import export, load_checkpoint

    folder = _copy(next_model[0], tmp_path / "bad")
    raw = json.loads((folder / file).read_text())
    (folder / file).write_text(json.dumps({**raw, key: value}))
    with pytest.raises(RelaxlmError, match=message):
        export(load_checkpoint(folder))
