"""Structured output: JSON constrained by a grammar, compiled with llguidance.

A request's `response_format` (or a forced tool call's schema) becomes a grammar once; each
completion then gets its own `GrammarConstraint` (runtime/sampler.py's TokenConstraint), whose
mask the sampler applies before every choice. Once the JSON is complete the grammar allows only
the stop tokens, so the completion ends with "stop".

llguidance (the `structured` extra) has no dependencies of its own (no torch, no triton); it is
imported on first use, so plain text generation never needs it.
"""

import functools
import json
import threading

import numpy as np

from relaxlm.errors import RelaxlmError
from relaxlm.runtime.tokenizer import Tokenizer

_CACHE_SIZE = 64
# Compact separators and no free whitespace: a weak model cannot stall in spaces.
_COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


def _llguidance():
    try:
        import llguidance
    except ImportError as e:
        raise RelaxlmError(
            "structured output (response_format, forced tool calls) needs llguidance: "
            "pip install 'relaxlm[structured]'"
        ) from e
    return llguidance


class GrammarCompiler:
    """Compiles JSON schemas into grammars over one tokenizer's vocabulary; thread-safe.

    vocab_size: the model's logits width (at least the tokenizer's; padded ids never match).
    stop_token_ids: the tokens that end a completion once the JSON is complete.
    """

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: list[int]):
        self.vocab_size = vocab_size
        # The llguidance tokenizer's recipe: a constraint sent to a replica in another process
        # (relaxlm/replicas.py) rebuilds it there from this, once per process.
        self._recipe = (tokenizer.backend.to_str(), vocab_size, tuple(stop_token_ids))
        self._tokenizer = _lltokenizer(self._recipe)
        self._lock = threading.Lock()
        self._cache: dict[str, str] = {}  # schema JSON -> checked grammar, oldest first

    def json_schema(self, schema: dict) -> str:
        """The grammar of compact JSON valid under `schema`; RelaxlmError if it is refused."""
        return self._compile(json.dumps(_closed_objects(schema), sort_keys=True))

    def json_object(self) -> str:
        """The grammar of any compact JSON object (response_format json_object)."""
        return self._compile(json.dumps({"type": "object"}))

    def _compile(self, schema_json: str) -> str:
        with self._lock:
            if schema_json in self._cache:
                return self._cache[schema_json]
        llg = _llguidance()
        grammar = llg.LLMatcher.grammar_from_json_schema(schema_json, overrides=_COMPACT_JSON)
        # Checking builds the lexer over the vocabulary: the cost is paid here, once per schema.
        failed, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, self._tokenizer)
        if failed:
            raise RelaxlmError(f"the JSON schema is not supported: {messages[0]}")
        with self._lock:
            if len(self._cache) >= _CACHE_SIZE:  # clients may send a new schema every time
                self._cache.pop(next(iter(self._cache)))
            self._cache[schema_json] = grammar
        return grammar

    def constraint_factory(self, grammar: str):
        """A SamplingParams.constraint: a fresh GrammarConstraint per completion."""
        return _ConstraintFactory(self._recipe, grammar)


@functools.lru_cache(maxsize=4)
def _lltokenizer(recipe: tuple[str, int, tuple[int, ...]]):
    tokenizer_json, vocab_size, stops = recipe
    return _llguidance().LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=list(stops))


class _ConstraintFactory:
    """A fresh GrammarConstraint per call; pickles as its recipe and grammar (llguidance's
    tokenizer does not pickle), for engines in other processes."""

    def __init__(self, recipe: tuple[str, int, tuple[int, ...]], grammar: str):
        self.recipe, self.grammar = recipe, grammar

    def __call__(self) -> "GrammarConstraint":
        return GrammarConstraint(_lltokenizer(self.recipe), self.grammar, self.recipe[1])


def _closed_objects(schema):
    """`schema` with "additionalProperties": false wherever an object lists its properties and
    says nothing of others, as OpenAI's strict structured outputs (and xgrammar) read schemas: a
    weak model offered free extra keys can write one key name until max_tokens."""
    if isinstance(schema, list):
        return [_closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {k: _closed_objects(v) for k, v in schema.items()}
    if "properties" in closed and not {"additionalProperties", "patternProperties"} & set(closed):
        closed["additionalProperties"] = False
    return closed


class GrammarConstraint:
    """One completion's grammar state: the mask of tokens that keep the output valid."""

    def __init__(self, tokenizer, grammar: str, vocab_size: int):
        llg = _llguidance()
        self._matcher = llg.LLMatcher(tokenizer, grammar, log_level=0)
        self._bitmask = np.zeros((vocab_size + 31) // 32, dtype=np.int32)

    def allowed(self, vocab_size: int) -> np.ndarray | None:
        if self._matcher.is_error():  # only a token the mask refused gets it here
            return None
        # A complete value leaves the matcher "stopped": its mask then holds the stop tokens.
        self._matcher.unsafe_compute_mask_ptr(self._bitmask.ctypes.data, self._bitmask.nbytes)
        bits = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")
        return bits[:vocab_size].astype(bool)

    def accept(self, token: int) -> None:
        if not self._matcher.is_stopped():
            self._matcher.consume_token(token)
