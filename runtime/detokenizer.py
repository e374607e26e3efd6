"""Streaming detokenization: text deltas that concatenate to `tokenizer.decode(all_ids)`.

Decoding one token at a time is wrong for SentencePiece ("▁" becomes a space only when it is
not the first piece) and for byte tokens (one character may span several tokens). So each step
decodes a short window of ids twice, without and with the newest tokens, and emits the
difference (the prefix-offset / read-offset technique of Hugging Face TGI and vLLM):

    ids = [ ... emitted ... | prefix_offset ... read_offset | newest ... ]
                              context, already emitted        candidates

Text ending in U+FFFD (an incomplete UTF-8 character) is held back until a later token
completes it, or `flush` emits it as is. So is a run of SentencePiece byte tokens (`<0xE6>`):
`tokenizers` decodes each run as a whole and turns all of it into U+FFFD if any byte in it is
invalid, so a run's text is final only once a non-byte token ends it (a skipped special token
does not: the runs on either side of it decode as one).
"""

import re

from relaxlm.runtime.tokenizer import Tokenizer

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class IncrementalDetokenizer:
    """Feeds generated ids one at a time; `push` returns the text they add, `flush` the rest."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the window decoded for context
        self.read_offset = 0  # ids before this have had their text emitted
        self._emitted: list[str] = []

    def push(self, token_id: int) -> str:
        """The new text once `token_id` is appended; "" while a character may be incomplete."""
        self.ids.append(int(token_id))
        if self._is_byte_token(token_id) or self._is_skipped(token_id):
            return ""
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        delta = new_text[len(prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self._emitted.append(delta)
        return delta

    def flush(self) -> str:
        """Any text still held back; call once, after the last `push`."""
        emitted = "".join(self._emitted)
        full = self._decode(self.ids)
        if full.startswith(emitted):
            delta = full[len(emitted) :]
        else:  # the window decode disagreed with the full decode; emit what the window holds
            prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
            delta = self._decode(self.ids[self.prefix_offset :])[len(prefix_text) :]
        self.prefix_offset = self.read_offset = len(self.ids)
        self._emitted.append(delta)
        return delta

    def _is_byte_token(self, token_id: int) -> bool:
        return bool(_BYTE_TOKEN.fullmatch(self.tokenizer.id_to_token(token_id) or ""))

    def _is_skipped(self, token_id: int) -> bool:
        return self.skip_special_tokens and token_id in self.tokenizer.special_ids

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)


class StopStrings:
    """Finds the first stop string in streamed text; text that might begin one is held back.

    `push` takes each text delta and returns (text safe to emit, whether a stop string was
    found); on a match the returned text ends right before it and the completion is over.
    Matching runs on the text, so a stop string split across tokens is found.
    """

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(stops)
        self._held = ""

    def push(self, delta: str) -> tuple[str, bool]:
        if not self.stops:
            return delta, False
        text = self._held + delta
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self._held = ""
            return text[: min(found)], True
        keep = self._longest_partial_match(text)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """The held-back text, once the completion ends for another reason."""
        text, self._held = self._held, ""
        return text

    def _longest_partial_match(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        for n in range(min(len(text), max(map(len, self.stops)) - 1), 0, -1):
            if any(s.startswith(text[-n:]) for s in self.stops):
                return n
        return 0
