"""Vision-language models (LLaVA) against transformers: preprocessing, image features, logits
through image+text prefill and decode, greedy tokens; and the image inputs' bad cases."""

import base64
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from relaxlm.compiler.pipeline import compile_model
from relaxlm.errors import RelaxlmError
from relaxlm.runtime.model import CompiledModel
from relaxlm.runtime.vision import ImageEncoder, ImageProcessor, load_image
from relaxlm.testing.tiny_vlm import make_llava_model

# Two tiny LLaVAs: the LLaVA-1.5 shape (second-to-last layer, class token dropped, Llama
# trunk), and a 35-pixel tower read at two layers with its class token, on a Mistral trunk.
CASES = {
    "llava_default": {},
    "llava_full_two_layers": {
        "seed": 1,
        "text_arch": "mistral",
        "vision_overrides": {"image_size": 35},
        "vision_feature_layer": [-3, -1],
        "vision_feature_select_strategy": "full",
    },
}


def _image(width: int, height: int, mode: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgba = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    image = Image.fromarray(rgba, "RGBA")
    if mode == "P":
        return image.convert("RGB").quantize(colors=17)
    return image if mode == "RGBA" else image.convert(mode)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """case -> (checkpoint folder, CompiledModel, ImageEncoder, transformers model)."""
    built = {}
    for case, kwargs in CASES.items():
        folder = make_llava_model(tmp_path_factory.mktemp(case), **kwargs)
        artifact = compile_model(folder, tmp_path_factory.mktemp(case) / "art", progress=False)
        model = CompiledModel(artifact, max_total_tokens=1024)
        hf = transformers.LlavaForConditionalGeneration.from_pretrained(folder).eval()
        built[case] = (folder, model, ImageEncoder(model), hf)
    return built


def _hf_processor(folder):
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls.from_pretrained(folder)


@pytest.mark.parametrize(
    ("size", "mode"),
    [((37, 23), "RGB"), ((23, 41), "RGBA"), ((28, 28), "L"), ((101, 57), "P"), ((9, 13), "LA")],
)
def test_preprocessing_equals_clip_image_processor(models, size, mode):
    folder, model, encoder, _ = models["llava_default"]
    image = _image(*size, mode, seed=sum(size))
    ours = encoder.processor(image)
    theirs = _hf_processor(folder)(images=image, return_tensors="np")["pixel_values"][0]
    assert ours.shape == theirs.shape == (3, 28, 28)
    diff = float(np.abs(ours - theirs).max())
    print(f"{mode} {size}: max |pixel diff| {diff:.2e}")
    assert diff <= 1e-5


def test_preprocessing_records_no_checkpoint_files(models):
    _, model, _, _ = models["llava_default"]
    vision = model.manifest.vision
    assert vision["tokens_per_image"] == 16 and vision["image_shape"] == [3, 28, 28]
    assert vision["resample"] == 3 and vision["size"] == {"shortest_edge": 28}
    assert ImageProcessor.from_manifest(vision).crop_size == {"height": 28, "width": 28}


def test_image_sources_give_the_same_pixels(models, tmp_path):
    _, _, encoder, _ = models["llava_default"]
    image = _image(40, 30, "RGB", seed=3)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    png = buffer.getvalue()
    path = tmp_path / "picture.png"
    path.write_bytes(png)
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    expected = encoder.processor(image)
    for source in (image, png, str(path), path, url):
        np.testing.assert_array_equal(encoder.pixel_values([source])[0], expected)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (b"not an image at all", "not a readable image"),
        ("data:image/png;base64,@@@", "not valid base64"),
        ("data:image/png,rawbytes", "must be base64"),
        ("/no/such/picture.png", "is not a file"),
        ("http://127.0.0.1:9/picture.png", "could not fetch image"),
        (12, "must be a file path"),
    ],
)
def test_bad_images_are_one_clear_error(source, message):
    with pytest.raises(RelaxlmError, match=message):
        load_image(source, timeout=2.0)


def test_oversized_image_is_refused():
    buffer = io.BytesIO()
    _image(64, 64, "RGB", seed=0).save(buffer, format="PNG")
    with pytest.raises(RelaxlmError, match="limit"):
        load_image(buffer.getvalue(), max_bytes=100)
    with pytest.raises(RelaxlmError, match="pixels"):
        load_image(Image.new("RGB", (10_000, 6_000)))


def test_text_model_refuses_images(compiled):
    with pytest.raises(RelaxlmError, match="text-only model"):
        ImageEncoder(compiled("llama_gqa").model)


@pytest.mark.parametrize("case", list(CASES))
def test_image_features_equal_transformers(models, case):
    _, model, encoder, hf = models[case]
    images = [_image(50, 31, "RGB", seed=1), _image(19, 44, "RGBA", seed=2)]
    pixels = encoder.pixel_values(images)
    ours = encoder.encode(pixels)
    with torch.no_grad():
        theirs = hf.model.get_image_features(
            torch.from_numpy(pixels),
            vision_feature_layer=hf.config.vision_feature_layer,
            vision_feature_select_strategy=hf.config.vision_feature_select_strategy,
        ).pooler_output
    theirs = torch.stack(list(theirs)).numpy()
    assert ours.shape == theirs.shape == (2, encoder.tokens_per_image, encoder.hidden_size)
    scale = float(np.abs(theirs).max())
    diff = float(np.abs(ours - theirs).max())
    print(f"{case}: image features max |diff| {diff:.2e} (max |feature| {scale:.1f})")
    assert diff <= 2e-6 * scale


def test_vision_encoder_is_bidirectional(models):
    """The first patch's feature depends on the last patch: a causal mask in the tower (where
    a patch sees only those before it) would leave it unchanged."""
    _, _, encoder, _ = models["llava_default"]
    pixels = encoder.pixel_values([_image(28, 28, "RGB", seed=5)])
    changed = pixels.copy()
    changed[:, :, -7:, -7:] += 1.0  # the bottom-right patch only
    before, after = encoder.encode(pixels), encoder.encode(changed)
    assert np.abs(after[0, 0] - before[0, 0]).max() > 1e-3
    assert np.abs(after[0, -1] - before[0, -1]).max() > 1e-3


def _prompt(encoder, n_images: int) -> list[int]:
    text = [1, 3, 57, 102, 250, 31, 77]
    ids = text[:3]
    for i in range(n_images):
        ids += [encoder.image_token_id, 40 + i]
    return encoder.expand(ids + text[3:])


def _ours(model, encoder, prompt, pixels, steps: int):
    """Logits after the image+text prefill, then after each greedy decode step; the tokens."""
    seq = 7
    model.add_sequence(seq)
    try:
        embeds = encoder.embeddings(prompt, encoder.encode(pixels))
        rows = [encoder.prefill_embeddings([seq], [embeds])[0]]
        tokens = [int(rows[-1].argmax())]
        for _ in range(steps - 1):
            rows.append(model.decode([seq], [tokens[-1]])[0])
            tokens.append(int(rows[-1].argmax()))
    finally:
        model.remove_sequence(seq)
    return np.stack(rows), tokens


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("sizes", [[(50, 31)], [(23, 64)], [(50, 31), (33, 33)]])
def test_logits_and_greedy_tokens_equal_transformers(models, case, sizes):
    _, model, encoder, hf = models[case]
    images = [_image(w, h, "RGB", seed=w * h) for w, h in sizes]
    pixels = encoder.pixel_values(images)
    prompt = _prompt(encoder, len(images))
    steps = 16
    ours, tokens = _ours(model, encoder, prompt, pixels, steps)
    with torch.no_grad():
        generated = hf.generate(
            torch.tensor([prompt]),
            pixel_values=torch.from_numpy(pixels),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=steps,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
        # One forward over prompt + our tokens: its logits at the last prompt position and at
        # each fed token are what prefill and the decode steps must give.
        full = torch.tensor([prompt + tokens[:-1]])
        theirs = hf(input_ids=full, pixel_values=torch.from_numpy(pixels)).logits[0]
        theirs = theirs[len(prompt) - 1 :].numpy()
    diff = float(np.abs(ours - theirs).max())
    print(f"{case} {sizes}: {len(prompt)} prompt tokens, max |logit diff| {diff:.2e}")
    assert diff <= 1e-4 * max(1.0, float(np.abs(theirs).max()))
    assert tokens == generated
    assert len(set(tokens)) >= 3  # the weights are not so degenerate that any bug passes


def test_wrong_image_count_is_one_clear_error(models):
    _, _, encoder, _ = models["llava_default"]
    prompt = _prompt(encoder, 2)
    features = encoder.encode(encoder.pixel_values([_image(30, 30, "RGB", seed=0)]))
    with pytest.raises(RelaxlmError, match="image tokens but 1 images need 16"):
        encoder.embeddings(prompt, features)


# -- the SDK --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm(models):
    import relaxlm

    _, model, _, _ = models["llava_default"]
    return relaxlm.LLM(model.folder, kv_cache_tokens=1024)


def _png_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _hf_greedy(hf, prompt_ids: list[int], pixels: np.ndarray, n: int = 16) -> list[int]:
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt_ids]),
            pixel_values=torch.from_numpy(pixels),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=n,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt_ids) :].tolist()


GREEDY = {"max_tokens": 16, "temperature": 0.0, "ignore_eos": True}


def test_chat_with_image_parts_equals_transformers(models, llm):
    import relaxlm

    folder, _, encoder, hf = models["llava_default"]
    images = [_image(45, 30, "RGB", seed=11), _image(30, 45, "RGBA", seed=12)]
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare "},
                {"type": "image_url", "image_url": {"url": _png_url(images[0])}},
                {"type": "text", "text": "with "},
                {"type": "image_url", "image_url": {"url": _png_url(images[1])}},
            ],
        }
    ]
    result = llm.chat(messages, relaxlm.SamplingParams(**GREEDY))
    # transformers' side: its processor's pixels, its tokenizer over the template's text.
    hf_messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare "},
                {"type": "image"},
                {"type": "text", "text": "with "},
                {"type": "image"},
            ],
        }
    ]
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    text = tokenizer.apply_chat_template(hf_messages, tokenize=False, add_generation_prompt=True)
    ids = encoder.expand(tokenizer(text, add_special_tokens=False)["input_ids"])
    pixels = _hf_processor(folder)(images=images, return_tensors="np")["pixel_values"]
    assert result.prompt_token_ids == ids
    assert result.token_ids == _hf_greedy(hf, ids, pixels)


def test_generate_with_images_dict_equals_chat_order(models, llm):
    import relaxlm

    _, _, encoder, hf = models["llava_default"]
    image = _image(64, 40, "RGB", seed=21)
    result = llm.generate(
        {"prompt": "Describe it.", "images": [image]}, relaxlm.SamplingParams(**GREEDY)
    )[0]
    ids = result.prompt_token_ids
    assert ids.count(encoder.image_token_id) == encoder.tokens_per_image
    assert result.token_ids == _hf_greedy(hf, ids, encoder.pixel_values([image]))


def test_prefix_cache_keys_on_image_content(llm):
    import relaxlm

    params = relaxlm.SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    a, b = _image(40, 40, "RGB", seed=31), _image(40, 40, "RGB", seed=32)
    prompt = "a much longer question about this picture, so that pages fill up"

    def hits(image) -> tuple[int, list[int]]:
        before = llm.metrics().prefix_cache_hit_tokens
        out = llm.generate({"prompt": prompt, "images": [image]}, params)[0]
        return llm.metrics().prefix_cache_hit_tokens - before, out.token_ids

    first_hit, first = hits(a)
    again_hit, again = hits(a)
    other_hit, other = hits(b)
    page = llm.model.page_size
    n = len(llm.check({"prompt": prompt, "images": [a]}))
    # The same image: every full page of the prompt but the last token's comes from the cache.
    assert again_hit == (n - 1) // page * page > encoder_tokens(llm)
    assert again == first
    # Another image at the same place: its first page already differs, so nothing is reused.
    assert other_hit == 0
    assert first_hit == 0


def encoder_tokens(llm) -> int:
    return llm.engine.images.tokens_per_image


def test_images_to_a_text_model_are_refused(compiled):
    llm = compiled("llama_gqa")
    url = _png_url(_image(20, 20, "RGB", seed=0))
    message = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}
    with pytest.raises(RelaxlmError, match="text-only model"):
        llm.chat([message])
    with pytest.raises(RelaxlmError, match="text-only model"):
        llm.generate({"prompt": "hi", "images": [url]})


def test_too_many_images_for_the_context(llm):
    # 256 tokens of context, 16 per image.
    images = [_image(20, 20, "RGB", seed=i) for i in range(17)]
    with pytest.raises(RelaxlmError, match="17 images take 272 tokens"):
        llm.generate({"prompt": "hi", "images": images})


# -- the CLI --------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "relaxlm", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_run_with_image_answers_as_chat(llm, tmp_path):
    path = tmp_path / "picture.png"
    _image(33, 47, "RGB", seed=41).save(path)
    assert_run_with_image_answers_as_chat(llm, path)


def assert_run_with_image_answers_as_chat(llm, path) -> None:
    """`relaxlm run ARTIFACT --image PATH` in a subprocess prints LLM.chat's answer for the
    same picture and prompt (shared with the other vision-language tests)."""
    import relaxlm

    proc = _cli(
        "run", llm.artifact, "--prompt", "What is it?", "--image", path,
        "--max-tokens", "8", "--temperature", "0",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    message = {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": str(path)}},
            {"type": "text", "text": "What is it?"},
        ],
    }
    expected = llm.chat([message], relaxlm.SamplingParams(max_tokens=8, temperature=0.0))
    assert proc.stdout == expected.text + "\n"


def test_cli_run_with_a_corrupt_image_is_one_clear_error(llm, tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    proc = _cli("run", llm.artifact, "--prompt", "hi", "--image", path, "--max-tokens", "2")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "not a readable image" in proc.stderr


# -- the server -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(llm):
    from relaxlm.server.app import ServerOptions, create_app
    from relaxlm.server.background import BackgroundServer

    options = ServerOptions(served_model_name="tiny-llava", mcp=True, ui=True)
    with BackgroundServer(create_app(llm, options)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _image_message(url: str, text: str = "What is in the picture?") -> dict:
    return {
        "role": "user",
        "content": [
            {"type": "text", "text": text},
            {"type": "image_url", "image_url": {"url": url}},
        ],
    }


def test_openai_client_sends_a_base64_image(client, llm):
    import relaxlm

    messages = [_image_message(_png_url(_image(52, 36, "RGB", seed=51)))]
    expected = llm.chat(messages, relaxlm.SamplingParams(max_tokens=12, temperature=0.0))
    args = dict(model="tiny-llava", messages=messages, max_tokens=12, temperature=0)
    plain = client.chat.completions.create(**args, logprobs=True)
    assert plain.choices[0].message.content == expected.text
    assert plain.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert plain.usage.completion_tokens == len(expected.token_ids)
    assert len(plain.choices[0].logprobs.content) == len(expected.token_ids)
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(**args, stream=True)
        if chunk.choices
    )
    assert streamed == expected.text
    import requests

    counted = requests.post(
        f"{client.base_url}".removesuffix("/v1/") + "/tokenize",
        json={"model": "tiny-llava", "messages": messages},
        timeout=30,
    ).json()
    assert counted["tokens"] == expected.prompt_token_ids


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB", "not a readable image"),
        ("data:image/png;base64,***", "not valid base64"),
        ("file-that-is-not-there.png", "is not a file"),
    ],
)
def test_bad_images_are_one_400(client, url, message):
    import openai

    with pytest.raises(openai.BadRequestError, match=message):
        client.chat.completions.create(
            model="tiny-llava", messages=[_image_message(url)], max_tokens=2
        )


def test_too_many_images_are_one_400(client):
    import openai

    url = _png_url(_image(20, 20, "RGB", seed=0))
    message = {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": url}}] * 17,
    }
    with pytest.raises(openai.BadRequestError, match="17 images take 272 tokens"):
        client.chat.completions.create(model="tiny-llava", messages=[message], max_tokens=2)


def test_image_to_a_text_model_is_one_400(compiled):
    import openai

    from relaxlm.server.app import ServerOptions, create_app
    from relaxlm.server.background import BackgroundServer

    app = create_app(compiled("llama_gqa"), ServerOptions(served_model_name="text"))
    with BackgroundServer(app) as s:
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="text-only model"):
            client.chat.completions.create(
                model="text",
                messages=[_image_message(_png_url(_image(20, 20, "RGB", seed=0)))],
                max_tokens=2,
            )


def test_transformers_4_layout_nests_the_tower(models, tmp_path):
    """The hub's llava-hf checkpoints name the tower `vision_tower.vision_model.*`: the same
    weights under those names compile to the same features as transformers loads from them."""
    import shutil

    from safetensors.numpy import load_file, save_file

    folder, _, encoder, _ = models["llava_default"]
    nested = tmp_path / "nested"
    shutil.copytree(folder, nested)
    tensors = load_file(nested / "model.safetensors")
    renamed = {
        n.replace("vision_tower.", "vision_tower.vision_model.", 1): t for n, t in tensors.items()
    }
    save_file(renamed, nested / "model.safetensors", metadata={"format": "pt"})
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(nested).eval()
    artifact = compile_model(nested, tmp_path / "art", progress=False)
    names = {p["name"] for p in CompiledModel(artifact).manifest.params}
    assert "vision_tower.vision_model.embeddings.class_embedding" in names
    ours = ImageEncoder(CompiledModel(artifact))
    pixels = ours.pixel_values([_image(40, 30, "RGB", seed=61)])
    with torch.no_grad():
        theirs = hf.model.get_image_features(
            torch.from_numpy(pixels), vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        ).pooler_output[0].numpy()  # fmt: skip
    np.testing.assert_allclose(ours.encode(pixels)[0], theirs, atol=2e-6 * np.abs(theirs).max())
    np.testing.assert_array_equal(ours.encode(pixels), encoder.encode(pixels))


def test_mcp_chat_tool_takes_images(server, llm):
    import asyncio

    from mcp import Client

    import relaxlm

    message = _image_message(_png_url(_image(38, 26, "RGB", seed=71)))
    arguments = {"messages": [message], "max_tokens": 10, "temperature": 0}

    async def session():
        async with Client(f"{server.url}/mcp") as client:
            answer = await client.call_tool("chat", arguments)
            broken = {**arguments, "messages": [_image_message("data:image/png;base64,AAAA")]}
            return answer, await client.call_tool("chat", broken)

    answer, broken = asyncio.run(session())
    expected = llm.chat([message], relaxlm.SamplingParams(max_tokens=10, temperature=0.0))
    assert not answer.is_error and answer.content[0].text == expected.text
    assert broken.is_error and "not a readable image" in broken.content[0].text


def test_web_ui_uploads_an_image(server, llm, tmp_path):
    """The chat page's image button in a real headless Chromium: the picture goes out as an
    image_url part and the answer equals LLM.chat's for the same file."""
    import shutil

    import relaxlm

    chromium = "/usr/bin/chromium"
    assert shutil.which(chromium), "needs Debian's chromium (apt-get install chromium)"
    from playwright.sync_api import expect, sync_playwright

    path = tmp_path / "upload.png"
    _image(41, 29, "RGB", seed=81).save(path)
    sent: list[dict] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on(
            "request",
            lambda r: (
                sent.append(json.loads(r.post_data)) if r.url.endswith("completions") else None
            ),
        )
        page.goto(f"{server.url}/ui")
        expect(page.locator("#model-fields")).to_contain_text("tiny-llava")
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "8")
        page.set_input_files("#image-input", str(path))
        expect(page.locator("#attachments img.thumb")).to_have_count(1)
        page.fill("#input", "What is it?")
        page.press("#input", "Enter")
        expect(page.locator(".msg.user img.thumb")).to_have_count(1)
        expect(page.locator(".msg.assistant.streaming")).to_have_count(0, timeout=30_000)
        answer = page.evaluate(
            "() => JSON.parse(localStorage['relaxlm.conversations']).at(-1).messages[1].content"
        )
        browser.close()
    assert not errors, errors
    (content,) = [m["content"] for m in sent[-1]["messages"] if m["role"] == "user"]
    assert [part["type"] for part in content] == ["image_url", "text"]
    url = content[0]["image_url"]["url"]
    assert url == "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    message = {"role": "user", "content": content}
    expected = llm.chat([message], relaxlm.SamplingParams(max_tokens=8, temperature=0.0))
    assert answer == expected.text


def test_images_split_across_prefill_chunks(models, llm):
    """Prefill chunks of 8 tokens cut each image's 16 tokens in two: the same greedy tokens as
    transformers, alone and batched with a text request."""
    import relaxlm

    _, model, encoder, hf = models["llava_default"]
    chunked = relaxlm.LLM(model.folder, kv_cache_tokens=1024, max_prefill_tokens=8)
    images = [_image(50, 31, "RGB", seed=91), _image(31, 50, "RGB", seed=92)]
    params = relaxlm.SamplingParams(**GREEDY)
    prompt = {"prompt": "two pictures", "images": images}
    results = chunked.generate([prompt, "a text prompt beside it"], params)
    ids = results[0].prompt_token_ids
    assert results[0].token_ids == _hf_greedy(hf, ids, encoder.pixel_values(images))
    assert results[1].token_ids == llm.generate("a text prompt beside it", params)[0].token_ids


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_artifacts_follow_transformers(models, tmp_path, dtype):
    """float16 / bfloat16 LLaVA (tower, projector and trunk in that dtype) against transformers
    run in the same dtype, within the text models' tolerance (relaxlm/testing/parity.py)."""
    from relaxlm.testing.parity import TOLERANCE, logit_error

    folder, _, _, _ = models["llava_default"]
    artifact = compile_model(folder, tmp_path / "art", dtype=dtype, progress=False)
    model = CompiledModel(artifact, max_total_tokens=256)
    encoder = ImageEncoder(model)
    pixels = encoder.pixel_values([_image(40, 30, "RGB", seed=101)])
    prompt = _prompt(encoder, 1)
    model.add_sequence(0)
    ours = encoder.prefill_embeddings([0], [encoder.embeddings(prompt, encoder.encode(pixels))])
    torch_dtype = getattr(torch, dtype)
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch_dtype)
    with torch.no_grad():
        theirs = hf.eval()(
            input_ids=torch.tensor([prompt]), pixel_values=torch.from_numpy(pixels).to(torch_dtype)
        ).logits[0, -1:]
    error = logit_error(ours, theirs.float().numpy())
    print(f"{dtype}: logit error {error:.2e} (tolerance {TOLERANCE[dtype]})")
    assert error <= TOLERANCE[dtype]
