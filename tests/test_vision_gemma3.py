"""Gemma 3 vision-language (`Gemma3ForConditionalGeneration`) against transformers: SigLIP
image features, logits through image+text prefill (image tokens attending to each other
bidirectionally) and decode, greedy tokens; and that the bidirectional part is tested."""

import numpy as np
import pytest
import torch
import transformers
from test_vision import _image

from relaxlm.compiler.pipeline import compile_model
from relaxlm.runtime.model import CompiledModel
from relaxlm.runtime.vision import ImageEncoder
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
