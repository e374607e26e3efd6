"""VITS / MMS-TTS text-to-speech: the waveform against transformers' VitsModel (same random
weights, same noise), VitsTokenizer's ids, and the SDK, CLI and OpenAI-client surfaces."""

import io
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import openai
import pytest
import requests
import soundfile
import torch
import transformers

import relaxlm
from relaxlm.runtime.vits import VitsTokenizer
from relaxlm.server.app import ServerOptions, create_app
from relaxlm.server.background import BackgroundServer
from relaxlm.testing.tiny_vits import load_reference, make_tiny_vits

TEXT = "Hello, World! It's a tiny test - of VITS."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ckpt = make_tiny_vits(tmp_path_factory.mktemp("vits"))
    return ckpt, relaxlm.LLM(str(ckpt)), load_reference(ckpt)


def test_tokenizer_equals_vits_tokenizer(tiny):
    ckpt, tts, _ = tiny
    reference = transformers.VitsTokenizer.from_pretrained(ckpt)
    ours = VitsTokenizer(tts.manifest.speech["tokenizer"])
    for text in [TEXT, "UPPER lower", "café  naïve 42!", "  spaces  ", "don't-stop"]:
        assert ours.encode(text) == reference(text)["input_ids"], text


def _ids(tts, text=TEXT):
    return tts.model.tokenizer.encode(text)


def test_waveform_equals_transformers_without_noise(tiny, monkeypatch):
    _, tts, ref = tiny
    monkeypatch.setitem(tts.model.speech, "noise_scale", 0.0)
    monkeypatch.setitem(tts.model.speech, "noise_scale_duration", 0.0)
    monkeypatch.setattr(ref, "noise_scale", 0.0)
    monkeypatch.setattr(ref, "noise_scale_duration", 0.0)
    ids = _ids(tts)
    with torch.no_grad():
        out = ref(torch.tensor([ids]))
    want = out.waveform[0].numpy()
    got = tts.model.synthesize_ids(ids).samples
    assert got.shape == want.shape == (int(out.sequence_lengths[0]),)
    assert np.abs(got - want).max() < 2e-5  # measured 0.5e-6 .. 2.4e-6
    assert np.abs(want).max() > 1e-3  # not a silent waveform


@pytest.mark.parametrize("speed", [1.0, 1.7])
def test_waveform_equals_transformers_with_the_same_noise(tiny, monkeypatch, speed):
    """transformers' torch.randn (duration noise) and torch.randn_like (prior noise) return the
    draws the runtime makes from its seeded numpy generator, in the same order."""
    _, tts, ref = tiny
    ids = _ids(tts)
    rng = np.random.default_rng(7)
    monkeypatch.setattr(
        torch,
        "randn",
        lambda *shape, **kw: torch.from_numpy(rng.standard_normal(shape, np.float32)),
    )
    monkeypatch.setattr(
        torch,
        "randn_like",
        lambda t, **kw: torch.from_numpy(rng.standard_normal(tuple(t.shape), np.float32)),
    )
    with torch.no_grad():
        want = ref(torch.tensor([ids]), speaking_rate=speed).waveform[0].numpy()
    got = tts.model.synthesize_ids(ids, speed=speed, rng=np.random.default_rng(7)).samples
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 2e-5  # measured 0.5e-6 .. 2.4e-6


def test_hub_layout_plain_duration_predictor_and_speakers(tmp_path, monkeypatch):
    """The MMS-TTS files' `weight_g` / `weight_v` names, the deterministic duration predictor
    (use_stochastic_duration_prediction false) and three speakers, against transformers."""
    ckpt = make_tiny_vits(
        tmp_path / "hub",
        seed=2,
        legacy_weight_norm=True,
        use_stochastic_duration_prediction=False,
        num_speakers=3,
        speaker_embedding_size=8,
    )
    tts, ref = relaxlm.LLM(str(ckpt)), load_reference(ckpt)
    monkeypatch.setitem(tts.model.speech, "noise_scale", 0.0)
    monkeypatch.setattr(ref, "noise_scale", 0.0)
    ids = _ids(tts)
    waves = []
    for speaker in (0, 2):
        with torch.no_grad():
            out = ref(torch.tensor([ids]), speaking_rate=0.8, speaker_id=speaker)
        want = out.waveform[0].numpy()
        got = tts.model.synthesize_ids(ids, speed=0.8, speaker=speaker).samples
        assert got.shape == want.shape
        assert np.abs(got - want).max() < 2e-5
        waves.append(got)
    assert waves[0].shape != waves[1].shape or np.abs(waves[0] - waves[1]).max() > 1e-3
    # OpenAI names by position: "ballad" is the third, speaker 2
    assert np.array_equal(
        tts.speak(TEXT, voice="2").samples, tts.speak(TEXT, voice="ballad").samples
    )
    with pytest.raises(relaxlm.RelaxlmError, match="speaker number 0 .. 2"):
        tts.speak(TEXT, voice="3")


# Measured max |error| (stats: means, log-variances, log-durations up to ~4.4; waveform up to
# ~0.5): float16 0.038 / 0.0018, bfloat16 0.19 / 0.005 - the bounds leave 2-4x. One 16-bit
# dtype is compiled here (each costs a compile); both share the graph's float32 islands.
HALF_TOLERANCES = {"float16": (0.1, 0.006), "bfloat16": (0.5, 0.02)}


@pytest.mark.parametrize("dtype", ["float16"])
def test_half_precision_entries_against_transformers(tiny, dtype):
    """Each entry alone (durations round to whole frames, so the full pipeline in 16 bits may
    pick another length): encode_text's statistics and decode_waveform on given latents,
    against transformers' float32 modules."""
    ckpt, tts32, ref = tiny
    tts = relaxlm.LLM(str(ckpt), dtype=dtype)
    ids = _ids(tts)
    n = len(ids)
    latents = np.random.default_rng(0).standard_normal((ref.config.flow_size, 60), np.float32)
    with torch.no_grad():
        mask = torch.ones(1, n, 1)
        enc = ref.text_encoder(input_ids=torch.tensor([ids]), padding_mask=mask)
        hidden = enc.last_hidden_state.transpose(1, 2)
        log_dur = ref.duration_predictor(
            hidden, mask.transpose(1, 2), None, reverse=True, noise_scale=0.0
        )
        stats = [enc.prior_means.transpose(1, 2), enc.prior_log_variances.transpose(1, 2), log_dur]
        want_stats = torch.cat(stats, 1)[0].numpy()
        x = ref.flow(torch.from_numpy(latents[None]), torch.ones(1, 1, 60), None, reverse=True)
        want_wave = ref.decoder(x)[0, 0].numpy()
    stats_tol, wave_tol = HALF_TOLERANCES[dtype]
    zeros = np.zeros((1, 2, n), np.float32)
    assert np.abs(tts32.model.encode_text(ids, zeros) - want_stats).max() < 1e-4
    assert np.abs(tts.model.encode_text(ids, zeros) - want_stats).max() < stats_tol
    assert np.abs(tts.model.decode_waveform(latents) - want_wave).max() < wave_tol


def test_sdk_speak_and_wav(tiny, tmp_path):
    _, tts, _ = tiny
    speech = tts.speak(TEXT, voice="alloy")
    assert speech.sampling_rate == 16000 and speech.samples.dtype == np.float32
    again = tts.speak(TEXT)
    assert np.array_equal(speech.samples, again.samples)  # the seed fixes the noise
    faster = tts.speak(TEXT, speed=2.0)
    assert faster.samples.size < speech.samples.size
    with pytest.raises(relaxlm.RelaxlmError, match="voice 'bob'"):
        tts.speak(TEXT, voice="bob")
    with pytest.raises(relaxlm.RelaxlmError, match="speed"):
        tts.speak(TEXT, speed=9.0)
    with pytest.raises(relaxlm.RelaxlmError, match="no characters"):
        tts.speak("123 ?!")
    with pytest.raises(relaxlm.RelaxlmError, match="speech synthesizer"):
        tts.generate("hi")


def test_cli_speak(tiny, tmp_path):
    ckpt, tts, _ = tiny
    out = tmp_path / "out.wav"
    subprocess.run(
        [sys.executable, "-m", "relaxlm", "speak", str(tts.artifact), TEXT, "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    samples, rate = soundfile.read(out, dtype="float32")
    want = tts.speak(TEXT).samples
    assert rate == 16000 and samples.shape == want.shape
    assert np.abs(samples - want).max() <= 1.0 / 32767 + 1e-6  # 16-bit PCM


@pytest.fixture(scope="module")
def client(tiny):
    _, tts, _ = tiny
    with BackgroundServer(create_app(tts, ServerOptions(served_model_name="v"))) as server:
        yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0), server


def test_openai_client_speech(client, tiny):
    api, _ = client
    want = tiny[1].speak(TEXT).samples
    for fmt in ("wav", "flac"):
        reply = api.audio.speech.create(model="v", voice="alloy", input=TEXT, response_format=fmt)
        samples, rate = soundfile.read(io.BytesIO(reply.content), dtype="float32")
        assert rate == 16000 and samples.shape == want.shape, fmt
        assert np.abs(samples - want).max() <= 1.0 / 32767 + 1e-6, fmt
    pcm = api.audio.speech.create(model="v", voice="nova", input=TEXT, response_format="pcm")
    assert len(pcm.content) == 2 * want.size
    for fmt in ("mp3", "opus"):  # lossy: the rate and about the duration
        reply = api.audio.speech.create(model="v", voice="echo", input=TEXT, response_format=fmt)
        samples, rate = soundfile.read(io.BytesIO(reply.content), dtype="float32")
        assert rate == 16000 and abs(samples.size - want.size) < 0.1 * rate, fmt
    default = api.audio.speech.create(model="v", voice="alloy", input=TEXT)  # OpenAI: mp3
    assert default.response.headers["content-type"] == "audio/mpeg"


def test_bad_speech_requests_get_one_clear_400(client):
    api, server = client
    cases = [
        (dict(voice="bob", input=TEXT), "voice 'bob'"),
        (dict(voice="alloy", input=""), "empty"),
        (dict(voice="alloy", input=TEXT, response_format="aac"), "response_format"),
        (dict(voice="alloy", input=TEXT, speed=9.0), "speed"),
    ]
    for kwargs, words in cases:
        with pytest.raises(openai.BadRequestError, match=words):
            api.audio.speech.create(model="v", **kwargs)
    with pytest.raises(openai.BadRequestError, match="speech synthesizer"):
        api.chat.completions.create(model="v", messages=[{"role": "user", "content": "hi"}])
    r = requests.post(
        f"{server.url}/v1/audio/transcriptions",
        files={"file": ("a.wav", b"RIFF")},
        data={"model": "v"},
        timeout=30,
    )
    assert r.status_code == 400 and "not a speech model" in r.json()["error"]["message"]


def test_speech_route_on_a_speech_recognizer_is_a_400():
    """Any model that is not a synthesizer (here a stand-in with Whisper's task) is refused."""
    stub = SimpleNamespace(artifact="whisper", manifest=SimpleNamespace(task="transcribe"))
    with BackgroundServer(create_app(stub, ServerOptions(served_model_name="w"))) as server:
        api = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="not a text-to-speech model"):
            api.audio.speech.create(model="w", voice="alloy", input=TEXT)


def test_tiny_vits_compiles_for_cuda(tiny):
    """Both entries build for CUDA with every kernel scheduled (CUDA source, no GPU here): the
    depthwise convs of dynamic length, whose dlight reduction schedules would keep shared
    buffers as long as the text, take the next rule (compiler/schedules/gpu.py)."""
    from relaxlm.compiler import pipeline
    from relaxlm.compiler.targets import resolve_target
    from relaxlm.frontends import export, load_checkpoint

    exported = export(load_checkpoint(tiny[0]))
    executable, kv_cache, _ = pipeline.build_library(
        exported, resolve_target("cuda:sm_80"), device_binaries=False
    )
    (host,) = executable.mod.imports
    (device,) = host.imports
    assert device.kind == "cuda" and kv_cache is None
    assert "__global__" in device.inspect_source("")
