"""The Python SDK: `relaxlm.LLM` over a compiled artifact."""

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from relaxlm.artifacts import is_artifact
from relaxlm.errors import RelaxlmError
from relaxlm.runtime.chat_template import render_chat
from relaxlm.runtime.detokenizer import IncrementalDetokenizer
from relaxlm.runtime.model import CompiledModel
from relaxlm.runtime.sampler import Sampler, SamplingParams
from relaxlm.runtime.tokenizer import Tokenizer


@dataclass
class GenerationResult:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or stop token) or "length"


Prompt = str | list[int]


class LLM:
    """A model ready to generate: an artifact folder, or a checkpoint compiled into the cache."""

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        target: str = "cpu",
        quant: str = "none",
        dtype: str = "float32",
        device: str | None = None,
        max_batch_size: int = 8,
    ):
        if is_artifact(model):
            folder = Path(model)
        else:
            from relaxlm.cache import cached_artifact  # compiler code only when compiling

            folder = cached_artifact(model, target=target, quant=quant, dtype=dtype)
        self.artifact = folder
        self.model = CompiledModel(folder, device=device or target, max_batch_size=max_batch_size)
        self.manifest = self.model.manifest
        self.tokenizer = Tokenizer.from_dir(
            folder / "tokenizer", model_config=self.manifest.model_config
        )

    # -- generation ---------------------------------------------------------------------------

    def generate(
        self, prompts: Prompt | list[Prompt], params: SamplingParams | None = None
    ) -> list[GenerationResult]:
        """One result per prompt; a prompt is text or a list of token ids."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        results = []
        for prompt in prompts:
            ids = self._prompt_ids(prompt)
            steps = list(self._decode_loop(ids, params))
            tokens = [token for token, _, _ in steps]
            text = "".join(delta for _, delta, _ in steps)
            results.append(GenerationResult(ids, tokens, text, steps[-1][2]))
        return results

    def stream(
        self, prompt: Prompt | list[dict], params: SamplingParams | None = None
    ) -> Iterator[str]:
        """Text deltas as they are decoded; a list of messages is rendered as a chat."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            prompt = self._chat_ids(prompt)
        for _, delta, _ in self._decode_loop(self._prompt_ids(prompt), params or SamplingParams()):
            if delta:
                yield delta

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> GenerationResult:
        """One assistant reply to `messages`, through the model's own chat template."""
        return self.generate([self._chat_ids(messages)], params)[0]

    def apply_chat_template(self, messages: list[dict]) -> str:
        return render_chat(
            self.tokenizer.chat_template,
            messages,
            add_generation_prompt=True,
            bos_token=self.tokenizer.bos_token or "",
            eos_token=self.tokenizer.eos_token or "",
        )

    def score(self, token_ids: list[int], prefill: int) -> np.ndarray:
        """Next-token logits: row 0 after prefilling ids[:prefill], then one row per decode step.

        Shape (len(token_ids) - prefill + 1, vocab); the hook for parity tests.
        """
        if not 1 <= prefill <= len(token_ids):
            raise RelaxlmError(
                f"prefill={prefill} must be between 1 and len(token_ids)={len(token_ids)}"
            )
        self._check_length(len(token_ids))
        seq = self.model.add_sequence()
        try:
            rows = [self.model.prefill(seq, list(token_ids[:prefill]))]
            for token in token_ids[prefill:]:
                rows.append(self.model.decode([seq], [token])[0])
        finally:
            self.model.remove_sequence(seq)
        return np.stack(rows)

    # -- internals ----------------------------------------------------------------------------

    def _chat_ids(self, messages: list[dict]) -> list[int]:
        # The template writes BOS itself where the model wants one (as transformers does).
        return self.tokenizer.encode(self.apply_chat_template(messages), add_special_tokens=False)

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise RelaxlmError("the prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.model.vocab_size]
        if bad:
            raise RelaxlmError(f"token ids out of range [0, {self.model.vocab_size}): {bad[:5]}")
        self._check_length(len(ids))
        return ids

    def _check_length(self, n: int) -> None:
        if n > self.model.context_window:
            raise RelaxlmError(
                f"the prompt has {n} tokens, more than the model's context window of "
                f"{self.model.context_window}; shorten it"
            )

    def _decode_loop(self, prompt_ids: list[int], params: SamplingParams):
        """Yields (token, text delta, finish reason so far) for each generated token."""
        stop_ids = set(params.stop_token_ids) | (
            set() if params.ignore_eos else set(self.tokenizer.eos_token_ids)
        )
        sampler = Sampler(params)
        detok = IncrementalDetokenizer(self.tokenizer)
        seq = self.model.add_sequence()
        try:
            logits = self.model.prefill(seq, prompt_ids)
            length = len(prompt_ids)
            for step in range(params.max_tokens):
                token = sampler.sample(logits)
                length += 1
                if token in stop_ids:
                    yield token, detok.flush(), "stop"
                    return
                last = step == params.max_tokens - 1 or length >= self.model.context_window
                delta = detok.push(token)
                if last:
                    yield token, delta + detok.flush(), "length"
                    return
                yield token, delta, "length"
                logits = self.model.decode([seq], [token])[0]
        finally:
            self.model.remove_sequence(seq)
