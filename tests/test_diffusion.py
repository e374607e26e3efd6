"""Stable Diffusion against diffusers: the numpy schedulers step by step, then a tiny
random-weight pipeline (built here with diffusers' own classes and `save_pretrained`)
compiled for the CPU: each component, the tokenizer and whole seeded generations."""

import asyncio
import base64
import io
import json
import shutil
import sys

import numpy as np
import pytest
import requests
import torch

diffusers = pytest.importorskip("diffusers")

from relaxlm.compiler.diffusion import compile_diffusion  # noqa: E402
from relaxlm.image_generation import ImagePipeline  # noqa: E402
from relaxlm.runtime.schedulers import make_scheduler  # noqa: E402
from relaxlm.testing.servers import relaxlm_serve  # noqa: E402
from relaxlm.testing.tiny_diffusion import SD_SIZE, tiny_stable_diffusion  # noqa: E402

SIZE = SD_SIZE
LATENT = 8

SD15 = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
}
CASES = [
    ("DDIMScheduler", {}),
    ("DDIMScheduler", {"timestep_spacing": "trailing", "prediction_type": "v_prediction"}),
    (
        "DDIMScheduler",
        {"timestep_spacing": "linspace", "clip_sample": True, "beta_schedule": "linear"},
    ),
    ("EulerDiscreteScheduler", {}),
    ("EulerDiscreteScheduler", {"timestep_spacing": "linspace", "prediction_type": "v_prediction"}),
    ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
]


def _close(ours, ref, rel=1e-5):
    """float32 agreement: max error within `rel` of the reference's largest magnitude."""
    err = float(np.abs(ours - ref).max())
    assert err <= rel * float(np.abs(ref).max()), (err, float(np.abs(ref).max()))


@pytest.mark.parametrize(("name", "delta"), CASES)
def test_scheduler_matches_diffusers_step_by_step(name, delta):
    raw = {**SD15, **delta, "_class_name": name}
    ref = getattr(diffusers, name).from_config(raw)
    ours = make_scheduler(raw)
    steps = 7
    ref.set_timesteps(steps)
    ts = ours.timesteps(steps)
    np.testing.assert_allclose(ts, ref.timesteps.numpy(), rtol=0, atol=0)
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32) * ours.init_noise_sigma
    xr = torch.from_numpy(x.copy())
    for i, t in enumerate(ts):
        _close(ours.scale_input(x, i), ref.scale_model_input(xr, ref.timesteps[i]).numpy())
        eps = rng.standard_normal(x.shape).astype(np.float32)
        x = ours.step(eps, t, x, i)
        xr = ref.step(torch.from_numpy(eps), ref.timesteps[i], xr).prev_sample
        _close(x, xr.numpy())


def test_unknown_scheduler_is_a_clear_error():
    with pytest.raises(ValueError, match="PNDMScheduler.*not supported"):
        make_scheduler({**SD15, "_class_name": "PNDMScheduler"})


@pytest.fixture(scope="session", params=[False, True], ids=["sd1-conv-proj", "sd2-linear-proj"])
def sd(request, tmp_path_factory):
    """(diffusers pipeline, compiled relaxlm ImagePipeline) for a tiny random SD model."""
    root = tmp_path_factory.mktemp("sd")
    pipe = tiny_stable_diffusion(root, request.param)
    compile_diffusion(root / "sd", root / "artifact", height=SIZE, width=SIZE, progress=False)
    return pipe, ImagePipeline(str(root / "artifact"))


def _rel(ours, ref):
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def test_text_encoder_matches_diffusers(sd):
    pipe, ours = sd
    ids, _ = ours.model.tokenize(["a red fox", ""])
    ref_ids = pipe.tokenizer(
        ["a red fox", ""], padding="max_length", max_length=77, truncation=True
    )
    np.testing.assert_array_equal(ids, np.array(ref_ids.input_ids))
    with torch.no_grad():
        ref = pipe.text_encoder(torch.from_numpy(ids).long())[0].numpy()
    assert _rel(ours.model.encode_text(ids), ref) < 1e-5


def test_unet_step_matches_diffusers(sd):
    pipe, ours = sd
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, LATENT, LATENT)).astype(np.float32)
    t = np.array([981.0, 21.0], np.float32)
    ctx = rng.standard_normal((2, 77, 32)).astype(np.float32)
    with torch.no_grad():
        ref = pipe.unet(
            torch.from_numpy(x), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(ctx)
        )
    assert _rel(ours.model.denoise(x, t, ctx), ref.sample.numpy()) < 1e-5


def test_vae_decode_matches_diffusers(sd):
    pipe, ours = sd
    z = np.random.default_rng(2).standard_normal((1, 4, LATENT, LATENT)).astype(np.float32)
    with torch.no_grad():
        ref = pipe.vae.decode(torch.from_numpy(z) / pipe.vae.config.scaling_factor).sample.numpy()
    image = ours.model.decode_latents(z)
    assert image.shape == (1, 3, SIZE, SIZE)
    assert _rel(image, ref) < 1e-5


def _reference_scheduler(ours, name):
    """diffusers' scheduler `name` from the saved scheduler_config.json, the file relaxlm reads
    (not from the live config: diffusers does not carry defaulted keys such as DDIM's
    timestep_spacing over to another class, so Euler would fall back to linspace)."""
    source = ours.model.manifest["source"]
    with open(f"{source}/scheduler/scheduler_config.json") as f:
        return getattr(diffusers, name).from_config(json.load(f))


# Pixel tolerance (of 1) for a whole generation; both measured at 1.2e-7.
GENERATION_TOLERANCE = {"DDIMScheduler": 1e-4, "EulerDiscreteScheduler": 1e-4}


@pytest.mark.parametrize("scheduler", sorted(GENERATION_TOLERANCE))
def test_four_step_generation_matches_stable_diffusion_pipeline(sd, scheduler):
    """The whole loop (CFG at 7.5, 4 steps) from the same starting noise."""
    pipe, ours = sd
    pipe.scheduler = _reference_scheduler(ours, scheduler)
    noise = ours.initial_noise(seed=7, n=2)
    ref = pipe(
        "a red fox",
        num_inference_steps=4,
        guidance_scale=7.5,
        num_images_per_prompt=2,
        latents=torch.from_numpy(noise),
        output_type="np",
        height=SIZE,
        width=SIZE,
    ).images
    got = ours.generate("a red fox", n=2, steps=4, guidance_scale=7.5, seed=7, scheduler=scheduler)
    assert got.pixels.shape == ref.shape == (2, SIZE, SIZE, 3)
    assert float(np.abs(got.pixels - ref).max()) < GENERATION_TOLERANCE[scheduler]
    assert [im.size for im in got.images] == [(SIZE, SIZE)] * 2


def test_a_seed_gives_the_same_image_alone_or_batched(sd):
    _, ours = sd
    alone = ours.generate("a cat", n=1, steps=2, seed=11).pixels
    batch = ours.generate("a cat", n=3, steps=2, seed=10).pixels
    np.testing.assert_allclose(batch[1], alone[0], atol=1e-5)
    assert float(np.abs(batch[0] - batch[1]).max()) > 1e-2  # different seeds, different images


def test_an_over_long_prompt_is_truncated_as_diffusers_does(sd):
    pipe, ours = sd
    prompt = " ".join(["abc"] * 100)
    ids, cut = ours.model.tokenize([prompt])
    ref = pipe.tokenizer([prompt], padding="max_length", max_length=77, truncation=True).input_ids
    np.testing.assert_array_equal(ids, np.array(ref))
    assert cut == [True]
    assert ours.generate(prompt, steps=1).truncated


# -- POST /v1/images/generations, with the official openai client ---------------------------


@pytest.fixture(scope="module")
def image_server(sd):
    from relaxlm.server.background import BackgroundServer
    from relaxlm.server.image_generation import create_image_app

    _, ours = sd
    with BackgroundServer(create_image_app(ours, "tiny-sd", mcp=True, ui=True)) as s:
        yield s


@pytest.fixture(scope="module")
def client(image_server):
    import openai

    return openai.OpenAI(base_url=f"{image_server.url}/v1", api_key="unused", max_retries=0)


def _png(b64: str) -> np.ndarray:
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"))


def test_openai_client_generates_pngs_of_the_compiled_size(client, sd):
    _, ours = sd
    out = client.images.generate(
        model="tiny-sd",
        prompt="a red fox",
        n=2,
        size=f"{SIZE}x{SIZE}",
        response_format="b64_json",
        extra_body={"seed": 3, "steps": 2},
    )
    images = [_png(d.b64_json) for d in out.data]
    assert [im.shape for im in images] == [(SIZE, SIZE, 3)] * 2
    # The same seed through the SDK gives the same bytes; image 1 is seed 4 alone.
    sdk = ours.generate("a red fox", n=2, steps=2, seed=3).images
    np.testing.assert_array_equal(images[0], np.asarray(sdk[0]))
    alone = client.images.generate(prompt="a red fox", n=1, extra_body={"seed": 4, "steps": 2})
    np.testing.assert_array_equal(_png(alone.data[0].b64_json), images[1])


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"size": "512x512"}, "size"),
        ({"n": 5}, "n"),
        ({"n": 0}, "n"),
        ({"response_format": "url"}, "response_format"),
        ({"extra_body": {"steps": 0}}, "steps"),
    ],
)
def test_bad_requests_are_a_clear_400(client, kwargs, param):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="a fox", **kwargs)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param
    assert e.value.body["message"]


def test_an_over_long_prompt_is_cut_and_the_response_says_so(client):
    raw = client.images.with_raw_response.generate(
        prompt=" ".join(["abc"] * 100), extra_body={"steps": 1}
    )
    assert raw.headers["x-relaxlm-prompt-truncated"] == "true"
    assert _png(raw.parse().data[0].b64_json).shape == (SIZE, SIZE, 3)


# -- the MCP `generate_image` tool and the web page, on the same server ------------------------


def _tool_images(result) -> list[np.ndarray]:
    assert not result.is_error, result.content
    assert result.content[0].type == "text"
    images = result.content[1:]
    assert {(c.type, c.mime_type) for c in images} == {("image", "image/png")}
    return [_png(c.data) for c in images]


def test_mcp_generate_image_equals_the_sdk(image_server, sd):
    from mcp import Client

    _, ours = sd

    async def session():
        async with Client(f"{image_server.url}/mcp") as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            args = {"prompt": "a red fox", "n": 2, "seed": 3, "steps": 2}
            images = await client.call_tool("generate_image", args)
            too_many = await client.call_tool("generate_image", {**args, "n": 5})
            empty = await client.call_tool("generate_image", {"prompt": " ", "steps": 1})
            return tools, images, too_many, empty

    tools, result, too_many, empty = asyncio.run(session())
    assert set(tools) == {"generate_image"}
    schema = tools["generate_image"].input_schema
    assert schema["required"] == ["prompt"] and "size" not in schema["properties"]
    images = _tool_images(result)
    sdk = ours.generate("a red fox", n=2, steps=2, seed=3).images
    assert [im.shape for im in images] == [(SIZE, SIZE, 3)] * 2
    for got, want in zip(images, sdk, strict=True):
        np.testing.assert_array_equal(got, np.asarray(want))
    assert result.structured_content == {
        "count": 2,
        "size": f"{SIZE}x{SIZE}",
        "seed": 3,
        "prompt_truncated": False,
    }
    assert too_many.is_error and "n must be between 1 and 4, got 5" in too_many.content[0].text
    assert empty.is_error and "prompt must not be empty" in empty.content[0].text


def test_relaxlm_mcp_serves_generate_image_over_stdio(sd):
    from mcp import Client, StdioServerParameters

    _, ours = sd
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "relaxlm", "mcp", str(ours.model.folder)]
    )

    async def session():
        async with Client(params) as client:
            args = {"prompt": "a red fox", "seed": 5, "steps": 2}
            return await client.call_tool("generate_image", args)

    (image,) = _tool_images(asyncio.run(session()))
    sdk = ours.generate("a red fox", n=1, steps=2, seed=5).images[0]
    np.testing.assert_array_equal(image, np.asarray(sdk))


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)"
)
def test_web_page_generates_the_sdk_image(image_server, sd, tmp_path):
    """/ui in a real headless Chromium: the model card, then a seeded generation whose image
    is the SDK's, shown with its seed."""
    from playwright.sync_api import expect, sync_playwright

    _, ours = sd
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{image_server.url}/ui")
        assert page.url.endswith("/ui/images.html")
        expect(page.locator("#model-fields")).to_contain_text(f"{SIZE}x{SIZE}")
        page.fill("#seed", "7")
        page.fill("#steps", "2")
        page.fill("#n", "2")
        page.fill("#input", "a red fox")
        page.click("#send")
        images = page.locator(".generation img")
        expect(images).to_have_count(2, timeout=60_000)
        expect(page.locator(".generation figcaption")).to_contain_text("a red fox · seed 7")
        sources = [images.nth(i).get_attribute("src") for i in range(2)]
        page.screenshot(path=str(tmp_path / "images.png"))
        page.fill("#n", "9")  # more than the server makes: its 400 shows as the status
        page.click("#send")
        expect(page.locator("#status")).to_contain_text("n must be between 1 and 4, got 9")
        browser.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
    sdk = ours.generate("a red fox", n=2, steps=2, seed=7).images
    for src, want in zip(sources, sdk, strict=True):
        assert src.startswith("data:image/png;base64,")
        np.testing.assert_array_equal(_png(src.split(",", 1)[1]), np.asarray(want))


# -- the CLI -------------------------------------------------------------------------------


def test_relaxlm_serve_serves_a_diffusion_artifact(sd):
    import openai

    _, ours = sd
    options = ["--served-model-name", "cli-sd", "--ui", "--mcp"]
    with relaxlm_serve(str(ours.model.folder), *options) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        out = client.images.generate(
            model="cli-sd", prompt="a red fox", extra_body={"seed": 5, "steps": 2}
        )
        sdk = ours.generate("a red fox", n=1, steps=2, seed=5).images[0]
        np.testing.assert_array_equal(_png(out.data[0].b64_json), np.asarray(sdk))
        (card,) = client.models.list().data
        assert (card.id, card.task) == ("cli-sd", "image-generation")
        page = requests.get(f"{url}/ui", timeout=10)
        assert page.status_code == 200 and "images.js" in page.text


def test_cli_compiles_a_diffusers_folder_and_draws_the_sdk_image(sd, tmp_path, capsys):
    from PIL import Image

    from relaxlm.cli import main

    _, ours = sd
    source = ours.model.manifest["source"]
    artifact = tmp_path / "art"
    assert main(["compile", source, "-o", str(artifact), "--image-size", f"{SIZE}x{SIZE}"]) == 0
    out = tmp_path / "fox.png"
    args = ["draw", "a red fox", "-m", str(artifact), "-o", str(out), "--steps", "3", "--seed", "5"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "3/3" in err  # the progress bar counted every step
    sdk = ours.generate("a red fox", steps=3, seed=5).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(sdk))
    assert main(["compile", source, "-o", str(tmp_path / "bad"), "--image-size", "15x16"]) == 2
    assert "multiple of 2" in capsys.readouterr().err
    assert main(["bench", str(artifact), "--repeats", "1", "--steps", "4", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["size"] == f"{SIZE}x{SIZE}" and figures["steps"] == 4
    # the median gap between steps is at most their sum, which the image's time contains with
    # the first step, the text encoder and the VAE (a bound timing cannot break on a busy machine)
    assert 0 < figures["seconds_per_step"] < figures["seconds_per_image"]


# -- half precision on the CPU -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_images_stay_close_to_float32(sd, dtype, tmp_path):
    """Every component's weights and activations in `dtype` (bfloat16 group and layer norms
    computed in float32): the 4-step image within 0.005 of float32's (measured: float16 4e-4,
    bfloat16 8e-4)."""
    from safetensors.torch import load_file

    _, ours = sd
    out = compile_diffusion(
        ours.model.manifest["source"],
        tmp_path / dtype,
        height=SIZE,
        width=SIZE,
        dtype=dtype,
        progress=False,
    )
    for name in ("encode_text", "denoise", "decode_latents"):
        weights = load_file(str(out / f"{name}.safetensors"))
        assert {str(w.dtype) for w in weights.values()} == {f"torch.{dtype}"}, name
    got = ImagePipeline(str(out)).generate("a red fox", steps=4, seed=2).pixels
    ref = ours.generate("a red fox", steps=4, seed=2).pixels
    assert float(np.abs(got - ref).max()) < 0.005


# -- CUDA, compiled here (no GPU needed) ------------------------------------------------------


def test_every_component_compiles_for_cuda_in_float16(sd, tmp_path):
    """Codegen for sm_80 and sm_90 through the GPU schedules; kernels kept as CUDA source (no
    nvcc), as the CUDA compile matrix does without a toolkit."""
    _, ours = sd
    out = compile_diffusion(
        ours.model.manifest["source"],
        tmp_path / "cuda",
        target="cuda:sm_80,sm_90",
        height=SIZE,
        width=SIZE,
        dtype="float16",
        progress=False,
        device_binaries=False,
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dtype"] == "float16" and manifest["device"] == "cuda"
    for name, entry in manifest["entries"].items():
        assert (out / entry["library"]).stat().st_size > 0, name
        from safetensors.numpy import load_file

        weights = load_file(str(out / entry["weights"]))
        assert {w.dtype for w in weights.values()} == {np.dtype("float16")}, name


# -- q8 UNet linears ---------------------------------------------------------------------------


# quant -> (noise prediction: error / its largest magnitude, 4-step image: largest pixel error)
# measured: q8 4e-3 and 7e-3 / 6e-5 and 1e-4, q4 0.20 / 9e-4 (the two tiny models). 4-bit codes
# of random Gaussian weights err ~9% each, compounded over every layer; the image moves little.
QUANT_TOLERANCE = {"q8": (0.02, 0.02), "q4": (0.3, 0.01)}


@pytest.mark.parametrize("quant", QUANT_TOLERANCE)
def test_quantized_unet_linears_stay_within_the_stated_tolerance(sd, quant, tmp_path):
    """Integer codes with a scale per 32 for the UNet's linears (int8; q4: 4-bit, packed): the
    noise prediction and the 4-step DDIM image within QUANT_TOLERANCE of diffusers' float32."""
    from safetensors.numpy import load_file

    pipe, ours = sd
    out = compile_diffusion(
        ours.model.manifest["source"],
        tmp_path / quant,
        height=SIZE,
        width=SIZE,
        quant=quant,
        progress=False,
    )
    entry = json.loads((out / "manifest.json").read_text())["entries"]["denoise"]
    weights = load_file(str(out / entry["weights"]))
    codes = [n for n in weights if n.endswith(".q")]
    assert codes and all(np.issubdtype(weights[n].dtype, np.integer) for n in codes)
    assert "conv_in.weight" in weights  # convolutions stay float
    quantized = ImagePipeline(str(out))
    step_tolerance, image_tolerance = QUANT_TOLERANCE[quant]
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 4, LATENT, LATENT)).astype(np.float32)
    t = np.array([501.0], np.float32)
    ctx = ours.model.encode_text(ours.model.tokenize(["a red fox"])[0])
    step_error = _rel(quantized.model.denoise(x, t, ctx), ours.model.denoise(x, t, ctx))
    assert step_error < step_tolerance
    noise = ours.initial_noise(seed=2, n=1)
    pipe.scheduler = _reference_scheduler(ours, "DDIMScheduler")
    ref = pipe(
        "a red fox",
        num_inference_steps=4,
        latents=torch.from_numpy(noise),
        output_type="np",
        height=SIZE,
        width=SIZE,
    ).images
    got = quantized.generate("a red fox", steps=4, seed=2).pixels
    assert float(np.abs(got - ref).max()) < image_tolerance
