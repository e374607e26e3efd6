"""Structured output: JSON constrained by a grammar, compiled with xgrammar.

A request's `response_format` (or a forced tool call's schema) becomes a `CompiledGrammar`
once; each completion then gets its own `GrammarConstraint` (runtime/sampler.py's
TokenConstraint), whose mask the sampler applies before every choice. Once the JSON is complete
the grammar allows only the stop tokens, so the completion ends with "stop".

xgrammar is imported on first use: it imports torch, which plain text generation never needs.
"""

import functools
import json
import re
import threading

import numpy as np

from relaxlm.errors import RelaxlmError
from relaxlm.runtime.tokenizer import Tokenizer

# xgrammar 0.2.8 lets a length-bounded string ("maxLength") hold control characters, which JSON
# forbids (json.loads rejects them): its character class excludes only \r and \n.
_LOOSE_STRING_CHAR = r"[^\"\\\r\n]"
_JSON_STRING_CHAR = r"[^\0-\x1f\"\\]"
_CACHE_SIZE = 64


def _xgrammar():
    try:
        import xgrammar
    except ImportError as e:
        raise RelaxlmError(
            "structured output (response_format, forced tool calls) needs xgrammar; install it "
            "after torch without its GPU dependencies: pip install --no-deps xgrammar==0.2.8"
        ) from e
    return xgrammar


class GrammarCompiler:
    """Compiles JSON schemas into grammars over one tokenizer's vocabulary; thread-safe.

    vocab_size: the model's logits width (at least the tokenizer's; padded ids never match).
    stop_token_ids: the tokens that end a completion once the JSON is complete.
    """

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: list[int]):
        xgr = _xgrammar()
        meta = xgr.TokenizerInfo._detect_metadata_from_hf(tokenizer.backend.to_str())
        vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
        encoded = [""] * max(len(vocab), max(vocab.values()) + 1)
        for token, i in vocab.items():
            encoded[i] = token
        self.vocab_size = vocab_size
        self._info = xgr.TokenizerInfo(
            encoded,
            meta["vocab_type"],
            vocab_size=vocab_size,
            stop_token_ids=list(stop_token_ids),
            add_prefix_space=meta["add_prefix_space"],
        )
        self._compiler = xgr.GrammarCompiler(self._info, max_threads=1)
        self._lock = threading.Lock()
        self._cache: dict[str, object] = {}  # schema JSON -> compiled grammar, oldest first

    def json_schema(self, schema: dict):
        """The grammar of compact JSON valid under `schema`; RelaxlmError if xgrammar refuses it."""
        return self._compile(json.dumps(schema))

    def json_object(self):
        """The grammar of any compact JSON object (response_format json_object)."""
        return self._compile(json.dumps({"type": "object"}))

    def _compile(self, schema_json: str):
        with self._lock:
            if schema_json in self._cache:
                return self._cache[schema_json]
        xgr = _xgrammar()
        try:
            # Compact separators and no free whitespace: a weak model cannot stall in spaces.
            grammar = xgr.Grammar.from_json_schema(schema_json, any_whitespace=False)
        except Exception as e:  # xgrammar raises RuntimeError / InvalidJSONError variants
            # Its messages start with a timestamp and a C++ source line: "[23:18:06] x.cc:49: ".
            reason = re.sub(r"^\[[^\]]*\] \S+:\d+: ", "", str(e).strip())
            raise RelaxlmError(f"the JSON schema is not supported: {reason}") from e
        ebnf = str(grammar).replace(_LOOSE_STRING_CHAR, _JSON_STRING_CHAR)
        with self._lock:
            compiled = self._compiler.compile_grammar(ebnf)
            if len(self._cache) >= _CACHE_SIZE:  # clients may send a new schema every time
                self._cache.pop(next(iter(self._cache)))
            self._cache[schema_json] = compiled
            return compiled

    def constraint_factory(self, compiled):
        """A SamplingParams.constraint: a fresh GrammarConstraint per completion."""
        return functools.partial(GrammarConstraint, compiled, self.vocab_size)


class GrammarConstraint:
    """One completion's grammar state: the mask of tokens that keep the output valid."""

    def __init__(self, compiled, vocab_size: int):
        xgr = _xgrammar()
        self._matcher = xgr.GrammarMatcher(compiled)
        self._bitmask = np.zeros((1, (vocab_size + 31) // 32), dtype=np.int32)

    def allowed(self, vocab_size: int) -> np.ndarray | None:
        if self._matcher.is_terminated():
            return None
        if not self._matcher.fill_next_token_bitmask(self._bitmask):
            return None  # every token is allowed
        bits = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")
        return bits[:vocab_size].astype(bool)

    def accept(self, token: int) -> None:
        if not self._matcher.is_terminated():
            self._matcher.accept_token(token)
