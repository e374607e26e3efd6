"""Whisper against transformers on a tiny random-weight checkpoint: log-mel features, encoder
states, decoder logits, and greedy token ids with and without timestamps, on a short and a
>30 s input (the reference's sequential long-form decoding)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from relaxlm.compiler.pipeline import compile_model  # noqa: E402
from relaxlm.runtime.whisper import WhisperModel  # noqa: E402
from relaxlm.runtime.whisper_decode import LogitRules  # noqa: E402
from relaxlm.testing.tiny_whisper import load_reference, make_tiny_whisper  # noqa: E402

RATE = 16000


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint folder, compiled model, transformers model), built once."""
    ckpt = make_tiny_whisper(tmp_path_factory.mktemp("whisper-ckpt"))
    art = compile_model(ckpt, tmp_path_factory.mktemp("whisper-art") / "a", progress=False)
    return ckpt, WhisperModel(art), load_reference(ckpt)


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
    ckpt, model, _ = tiny
    for seconds in (3.0, 30.0, 41.5):
        audio = _audio(seconds)
        np.testing.assert_allclose(model.features(audio), _features(ckpt, audio)[0], atol=2e-5)
    long = _audio(41.5)
    want = _features(ckpt, long, padding="longest", truncation=False)[0]
    got = model.features.spectrogram(long)[:, : long.size // 160]
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_encoder_and_decoder_logits_equal_transformers(tiny):
    ckpt, model, ref = tiny
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
    ckpt, model, ref = tiny
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
    ckpt, model, ref = tiny
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
