"""Structured outputs: a grammar (a JSON schema, any JSON object, a regex, a choice of strings or
a Lark/GBNF grammar) held by each row's own llguidance matcher, which masks the tokens that would
leave it before the row samples. A row's mask depends on its own tokens only, never on its batch
mates. Grammars are compiled and checked once per distinct text (cached); a bad one is a
RequestError that says what is wrong."""

from __future__ import annotations

import functools

import llguidance
import numpy as np
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

from service.engine.params import RequestError, StructuredOutputs

CACHED_GRAMMARS = 256


class Grammars:
    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_id: int) -> None:
        self.tokenizer_json = tokenizer_json
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self._compiled = functools.lru_cache(CACHED_GRAMMARS)(self._compile)

    @functools.cached_property
    def tokenizer(self) -> llguidance.LLTokenizer:
        """Built on the first structured request, not at start: for GPT-2's 50,257 tokens it
        takes seconds, which a server that never sees a grammar should not pay."""
        return llguidance.LLTokenizer(
            self.tokenizer_json, n_vocab=self.vocab_size, eos_token=self.eos_token_id
        )

    def grammar(self, spec: StructuredOutputs) -> str:
        """The checked grammar of the spec (cached by its text); RequestError if it is bad."""
        kind, text = spec.source()
        return self._compiled(kind, text)

    def _compile(self, kind: str, text: str) -> str:
        try:
            if kind == "json":
                # Compact JSON: with whitespace allowed anywhere, a small model may spend its
                # tokens on spaces and never close the object.
                grammar = llguidance.LLMatcher.grammar_from_json_schema(
                    text, defaults={"whitespace_flexible": False}
                )
            else:
                grammar = llguidance.grammar_from(kind, text)  # type: ignore[arg-type]
        except ValueError as e:
            raise RequestError(f"structured_outputs: {kind}: {e}") from None
        problem = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if problem:
            raise RequestError(f"structured_outputs: {kind}: {problem}")
        return grammar

    def matcher(self, spec: StructuredOutputs) -> Matcher:
        return Matcher(llguidance.LLMatcher(self.tokenizer, self.grammar(spec)), self.vocab_size)


class Matcher:
    """One row's grammar state."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self.matcher = matcher
        self.mask = allocate_token_bitmask(1, vocab_size)
        self.vocab_size = vocab_size

    def allowed(self) -> np.ndarray:
        """A boolean row of the tokens the grammar allows next (the end token once it is
        complete)."""
        fill_next_token_bitmask(self.matcher, self.mask)
        bits = np.unpackbits(self.mask.view(np.uint8), bitorder="little")
        return bits[: self.vocab_size].astype(bool)

    def consume(self, token: int) -> None:
        self.matcher.consume_token(token)

    @property
    def done(self) -> bool:
        """The grammar takes nothing more but the end token."""
        return self.matcher.is_stopped()

    @property
    def error(self) -> str:
        return self.matcher.get_error()
