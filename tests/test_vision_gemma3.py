"""Gemma 3 vision-language (`Gemma3ForConditionalGeneration`) against transformers: SigLIP
image features, logits through image+text prefill (image tokens attending to each other
bidirectionally) and decode, greedy tokens; and that the bidirectional part is tested."""

import numpy as np
import pytest
import torch
import transformers
from test_vision import GREEDY, _image, _png_url, assert_run_with_image_answers_as_chat

from relaxlm.compiler.pipeline import compile_model
from relaxlm.runtime.model import CompiledModel
from relaxlm.runtime.vision import ImageEncoder
from relaxlm.testing.parity import reference_greedy
from relaxlm.testing.tiny_vlm import make_gemma3_vl_model

TEXT = [57, 102, 250, 31, 77, 140, 9]


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    """(checkpoint folder, CompiledModel, ImageEncoder, transformers model)."""
    folder = make_gemma3_vl_model(tmp_path_factory.mktemp("gemma3_vl"), seed=3)
    artifact = compile_model(folder, tmp_path_factory.mktemp("gemma3_vl") / "art", progress=False)
    model = CompiledModel(artifact, max_total_tokens=512)
    hf = transformers.Gemma3ForConditionalGeneration.from_pretrained(folder).eval()
    return folder, model, ImageEncoder(model), hf


def _prompt(hf, n_images: int) -> list[int]:
    """bos, text, then per image `boi, soft tokens, eoi` and text, as the processor lays out."""
    c = hf.config
    ids = [1, *TEXT[:3]]
    for i in range(n_images):
        ids += [c.boi_token_index, *[c.image_token_index] * c.mm_tokens_per_image]
        ids += [c.eoi_token_index, 40 + i, 41 + i]
    return ids + TEXT[3:]


def _ours(model, encoder, prompt, pixels, steps: int, bidirectional: bool = True):
    """Logits after the prefill, then after each greedy decode step; the tokens.
    bidirectional=False: the whole prompt through the causal prefill (the bug to catch)."""
    seq = 5
    model.add_sequence(seq)
    try:
        embeds = encoder.embeddings(prompt, encoder.encode(pixels))
        if bidirectional:
            is_image = np.asarray(prompt) == encoder.image_token_id
            rows = [encoder.prefill_image_blocks(seq, embeds, is_image)]
        else:
            chunk = model.prefill_chunk
            for start in range(0, len(embeds), chunk):
                rows = [encoder.prefill_embeddings([seq], [embeds[start : start + chunk]])[0]]
        tokens = [int(rows[-1].argmax())]
        for _ in range(steps - 1):
            rows.append(model.decode([seq], [tokens[-1]])[0])
            tokens.append(int(rows[-1].argmax()))
    finally:
        model.remove_sequence(seq)
    return np.stack(rows), tokens


def _theirs(hf, prompt, pixels, tokens):
    """transformers' logits at the last prompt position and at each of `tokens` but the last."""
    full = torch.tensor([prompt + tokens[:-1]])
    token_type_ids = (full == hf.config.image_token_index).long()  # as Gemma3Processor makes
    with torch.no_grad():
        logits = hf(
            input_ids=full, pixel_values=torch.from_numpy(pixels), token_type_ids=token_type_ids
        ).logits[0]
    return logits[len(prompt) - 1 :].numpy()


def test_image_features_equal_transformers(gemma3):
    _, _, encoder, hf = gemma3
    images = [_image(50, 31, "RGB", seed=1), _image(19, 44, "RGBA", seed=2)]
    pixels = encoder.pixel_values(images)
    ours = encoder.encode(pixels)
    with torch.no_grad():
        theirs = hf.model.get_image_features(torch.from_numpy(pixels)).pooler_output.numpy()
    assert ours.shape == theirs.shape == (2, hf.config.mm_tokens_per_image, encoder.hidden_size)
    scale = float(np.abs(theirs).max())
    diff = float(np.abs(ours - theirs).max())
    print(f"gemma3 image features max |diff| {diff:.2e} (max |feature| {scale:.1f})")
    assert diff <= 2e-6 * scale


@pytest.mark.parametrize("n_images", [1, 2])
def test_logits_and_greedy_tokens_equal_transformers(gemma3, n_images):
    _, model, encoder, hf = gemma3
    images = [_image(40 + 9 * i, 33, "RGB", seed=7 + i) for i in range(n_images)]
    pixels = encoder.pixel_values(images)
    prompt = _prompt(hf, n_images)
    steps = 8
    ours, tokens = _ours(model, encoder, prompt, pixels, steps)
    theirs = _theirs(hf, prompt, pixels, tokens)
    token_type_ids = (torch.tensor([prompt]) == hf.config.image_token_index).long()
    with torch.no_grad():
        generated = hf.generate(
            torch.tensor([prompt]),
            pixel_values=torch.from_numpy(pixels),
            token_type_ids=token_type_ids,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=steps,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
    bound = 1e-4 * max(1.0, float(np.abs(theirs).max()))
    diff = float(np.abs(ours - theirs).max())
    print(f"gemma3 {n_images} images: {len(prompt)} tokens, max |logit diff| {diff:.2e}")
    assert diff <= bound
    assert tokens == generated
    assert len(set(tokens)) >= 3  # the weights are not so degenerate that any bug passes

    # The same prompt with causal attention over the image tokens misses transformers by far
    # more than the bound: the test above can fail on the mask.
    causal, _ = _ours(model, encoder, prompt, pixels, 1, bidirectional=False)
    miss = float(np.abs(causal[0] - theirs[0]).max())
    print(f"gemma3 {n_images} images, causal image tokens: max |logit diff| {miss:.2e}")
    assert miss > 20 * bound


# -- the user's path: preprocessing, the chat template's image markers, LLM.chat ------------


def _hf_processor(folder, tokens_per_image: int = 4):
    return transformers.Gemma3Processor(
        image_processor=transformers.AutoImageProcessor.from_pretrained(folder),
        tokenizer=transformers.AutoTokenizer.from_pretrained(folder),
        image_seq_length=tokens_per_image,
    )


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_preprocessing_equals_gemma3_image_processor(gemma3, mode):
    folder, _, encoder, _ = gemma3
    processor = _hf_processor(folder).image_processor
    for size in [(50, 31), (23, 64), (9, 13), (28, 28)]:
        image = _image(*size, mode, seed=sum(size))
        ours = encoder.pixel_values([image])
        theirs = processor(images=image, return_tensors="np")["pixel_values"]
        assert ours.shape == theirs.shape == (1, 3, 28, 28)
        diff = float(np.abs(ours - theirs).max())
        print(f"gemma3 {mode} {size}: max |pixel diff| {diff:.1e}")
        assert diff <= 1e-5


@pytest.fixture(scope="module")
def llm(gemma3):
    import relaxlm

    _, model, _, _ = gemma3
    return relaxlm.LLM(model.folder, kv_cache_tokens=512)


def _chat(images: list, text: str = "Compare ") -> tuple[list[dict], list[dict]]:
    """(OpenAI-style messages with the images as data URLs, the same for transformers)."""
    ours = [{"type": "text", "text": text}]
    theirs = [{"type": "text", "text": text}]
    for image in images:
        ours.append({"type": "image_url", "image_url": {"url": _png_url(image)}})
        theirs.append({"type": "image"})
        ours.append({"type": "text", "text": " and"})
        theirs.append({"type": "text", "text": " and"})
    return [{"role": "user", "content": ours}], [{"role": "user", "content": theirs}]


def _hf_chat_greedy(folder, hf, messages, images, n: int) -> tuple[list[int], list[int]]:
    """Gemma3Processor's prompt ids for the messages and images, and generate's tokens."""
    processor = _hf_processor(folder, hf.config.mm_tokens_per_image)
    text = processor.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    inputs = processor(text=text, images=images, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = hf.generate(
            **inputs, do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0
        )
    ids = inputs["input_ids"][0].tolist()
    return ids, out[0, len(ids) :].tolist()


@pytest.mark.parametrize("n_images", [1, 2])
def test_chat_with_images_equals_transformers(gemma3, llm, n_images):
    import relaxlm

    folder, _, _, hf = gemma3
    images = [_image(45, 30, "RGB", seed=11), _image(30, 45, "RGBA", seed=12)][:n_images]
    ours, theirs = _chat(images)
    result = llm.chat(ours, relaxlm.SamplingParams(**GREEDY))
    ids, tokens = _hf_chat_greedy(folder, hf, theirs, images, GREEDY["max_tokens"])
    assert result.prompt_token_ids == ids
    assert result.token_ids == tokens
    assert len(set(tokens)) >= 3


@pytest.mark.parametrize("step", [3, 5])
def test_images_split_across_prefill_chunks(gemma3, step):
    """Prefill steps of 3 or 5 tokens cut the 4-token images: the logits still equal
    transformers' (an image's first tokens are computed again with its last)."""
    _, model, encoder, hf = gemma3
    c = hf.config
    images = [_image(45, 30, "RGB", seed=11), _image(30, 45, "RGBA", seed=12)]
    one_each = [1, *TEXT[:3], c.boi_token_index, c.image_token_index, c.eoi_token_index, 40]
    one_each += [c.boi_token_index, c.image_token_index, c.eoi_token_index, *TEXT[3:]]
    prompt = encoder.prompt(one_each, images)
    seq = 6
    model.add_sequence(seq)
    try:
        for start in range(0, len(prompt), step):
            chunk = prompt.token_ids[start : start + step]
            ours = encoder.prefill_tokens([seq], [chunk], prompt.rows)[0]
    finally:
        model.remove_sequence(seq)
    theirs = _theirs(hf, prompt.text_ids, encoder.pixel_values(images), [0])[0]
    diff = float(np.abs(ours - theirs).max())
    print(f"gemma3 prefill steps of {step}: max |logit diff| {diff:.2e}")
    assert diff <= 1e-4 * max(1.0, float(np.abs(theirs).max()))


def test_cli_run_with_image_answers_as_chat(llm, tmp_path):
    path = tmp_path / "picture.png"
    _image(33, 47, "RGB", seed=41).save(path)
    assert_run_with_image_answers_as_chat(llm, path)


def test_openai_client_gets_the_sdk_answer(llm):
    """The server with the official openai client: two base64 images give LLM.chat's tokens."""
    import openai

    import relaxlm
    from relaxlm.server.app import ServerOptions, create_app
    from relaxlm.server.background import BackgroundServer

    messages, _ = _chat([_image(61, 22, "RGB", seed=31), _image(20, 20, "L", seed=32)])
    expected = llm.chat(messages, relaxlm.SamplingParams(max_tokens=12, temperature=0.0))
    with BackgroundServer(create_app(llm, ServerOptions(served_model_name="gemma3"))) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        answer = client.chat.completions.create(
            model="gemma3", messages=messages, max_tokens=12, temperature=0
        )
    assert answer.choices[0].message.content == expected.text
    assert answer.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert answer.usage.completion_tokens == len(expected.token_ids) == 12


def _hf_greedy(hf, ids: list[int], pixels: np.ndarray | None, n: int) -> list[int]:
    """generate's tokens for prompt ids holding the image token, with token_type_ids."""
    images = {}
    if pixels is not None:
        images = {
            "pixel_values": torch.from_numpy(pixels),
            "token_type_ids": (torch.tensor([ids]) == hf.config.image_token_index).long(),
        }
    return reference_greedy(hf, ids, n, **images)


def test_prefix_cache_hit_ending_inside_an_image(gemma3, llm):
    """A second prompt with the same text and image up to a page boundary that cuts the image:
    its cached pages hold the image's first tokens (which saw all of it), the rest of the
    image is computed as a block over them; the tokens equal transformers'."""
    import relaxlm

    _, _, encoder, hf = gemma3
    image = _image(40, 40, "RGB", seed=33)
    params = relaxlm.SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    page = llm.model.page_size
    head = "one two three four five six seven eight nine ten eleven twelve <start_of_image>"
    first = llm.generate({"prompt": head + " what is it", "images": [image]}, params)[0]
    at = [i for i, t in enumerate(first.prompt_token_ids) if t == hf.config.image_token_index]
    boundary = at[-1] // page * page
    assert at[0] < boundary, f"the image's tokens {at} must straddle a page boundary"
    before = llm.metrics().prefix_cache_hit_tokens
    second = llm.generate({"prompt": head + " and now?", "images": [image]}, params)[0]
    assert llm.metrics().prefix_cache_hit_tokens - before == boundary
    pixels = encoder.pixel_values([image])
    assert second.token_ids == _hf_greedy(hf, second.prompt_token_ids, pixels, 6)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"mm_tokens_per_image": 5}, "mm_tokens_per_image 5 must be a square"),
        ({"mm_tokens_per_image": 9}, "mm_tokens_per_image 9 must be a square"),  # 3 into 4x4
        ({"mm_tokens_per_image": 16, "sliding_window": 8}, "at most the sliding window 8"),
        ({"vision_model_type": "clip_vision_model"}, "clip_vision_model' is not supported"),
    ],
)
def test_bad_config_is_one_clear_error(gemma3, change, message):
    import json

    from relaxlm.errors import RelaxlmError
    from relaxlm.frontends.gemma3_vl import Gemma3VLConfig

    folder = gemma3[0]
    raw = json.loads((folder / "config.json").read_text())
    if "mm_tokens_per_image" in change:
        raw["mm_tokens_per_image"] = change["mm_tokens_per_image"]
    if "sliding_window" in change:
        raw["text_config"]["sliding_window"] = change["sliding_window"]
    if "vision_model_type" in change:
        raw["vision_config"]["model_type"] = change["vision_model_type"]
    with pytest.raises(RelaxlmError, match=message):
        Gemma3VLConfig.from_dict(raw)


def test_transformers_4_layout_nests_the_tower(gemma3):
    """The hub's checkpoints name the tower `vision_tower.vision_model.*`: that tree is built."""
    import json

    from relaxlm.frontends.gemma3_vl import Gemma3ForConditionalGeneration, Gemma3VLConfig

    config = Gemma3VLConfig.from_dict(json.loads((gemma3[0] / "config.json").read_text()))
    for nested in (True, False):
        names = ["vision_tower.vision_model.post_layernorm.weight"] if nested else []
        model = Gemma3ForConditionalGeneration.for_tensors(config, names)
        tower = [n for n, _ in model.named_parameters() if n.startswith("vision_tower.")]
        assert len(tower) == 3 + 16 * 2 + 2  # embeddings, 2 layers of 16, post_layernorm
        assert all(n.startswith("vision_tower.vision_model.") == nested for n in tower)


def test_image_prompt_batched_with_a_text_prompt(gemma3, llm):
    """An image prompt and a text prompt in one generate call (their prefills share steps):
    each gets transformers' tokens."""
    import relaxlm

    _, _, encoder, hf = gemma3
    picture = _image(30, 30, "RGB", seed=51)
    params = relaxlm.SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    image = {"prompt": "<start_of_image> what now, in a few words?", "images": [picture]}
    text = "a text prompt long enough for more than one prefill chunk of sixteen tokens"
    with_image, text_only = llm.generate([image, text], params)
    pixels = encoder.pixel_values([picture])
    assert with_image.token_ids == _hf_greedy(hf, with_image.prompt_token_ids, pixels, 6)
    assert text_only.token_ids == _hf_greedy(hf, text_only.prompt_token_ids, None, 6)
