"""Constrained decoding with llguidance: JSON schemas compiled to grammars, and per-sequence matchers.

llguidance over xgrammar: both produced schema-valid JSON from SmolLM2 (docs/MODELS.md), but xgrammar
pulls triton (1 GB) that it does not use on a CPU, llguidance is 7 MB. A mask here took ~2 ms per token.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any, Literal

import llguidance
import llguidance.hf
import llguidance.numpy
import torch

# One fixed layout, as json.dumps writes it: flexible whitespace lets small models emit newlines forever.
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class InvalidGrammar(ValueError):
    pass


class GrammarCompiler:
    """Compiles and validates grammars against the model's tokenizer (built once, on first use)."""

    def __init__(self, hf_tokenizer: Any) -> None:
        self._hf_tokenizer = hf_tokenizer
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer)
            return self._tokenizer

    def json_schema(self, schema: dict[str, Any]) -> str:
        return self._checked(
            lambda: llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=_JSON_LAYOUT)
        )

    def text_grammar(self, syntax: Literal["lark", "regex"], definition: str) -> str:
        """A Lark grammar (llguidance's dialect) or a regular expression the whole output must match."""
        if syntax == "lark":
            return self._checked(lambda: llguidance.LLMatcher.grammar_from_lark(definition))
        return self._checked(lambda: llguidance.LLMatcher.grammar_from_regex(definition))

    def _checked(self, build: Callable[[], str]) -> str:
        """The grammar `build` makes, validated against this tokenizer; InvalidGrammar says why not."""
        try:
            grammar = build()
        except (ValueError, RuntimeError, TypeError) as exc:
            raise InvalidGrammar(str(exc)) from exc
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise InvalidGrammar(error)
        return grammar

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        return llguidance.LLMatcher(self.tokenizer, grammar)


def apply_grammar_masks(
    logits: torch.Tensor, matchers: list[llguidance.LLMatcher | None], tokenizer_vocab: int
) -> torch.Tensor:
    """Sets the logits of tokens a row's grammar forbids to -inf (rows without a matcher are untouched).

    Logits past the tokenizer's vocabulary (padding rows of the embedding) are always forbidden.
    """
    rows = [row for row, matcher in enumerate(matchers) if matcher is not None]
    if not rows:
        return logits
    # llguidance's numpy helpers, not its torch ones: llguidance.torch applies torch.compile when imported
    # (1.5 s of start-up) and again on first use (seconds, a C++ compiler).
    bitmask = llguidance.numpy.allocate_token_bitmask(len(rows), tokenizer_vocab)
    for index, row in enumerate(rows):
        llguidance.numpy.fill_next_token_bitmask(matchers[row], bitmask, index)
    logits = logits.clone()  # the unmasked logits still serve for logprobs
    bits = (torch.from_numpy(bitmask).unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    allowed = bits.reshape(len(rows), -1).bool().to(logits.device)
    width = min(allowed.shape[1], logits.shape[1])
    forbidden = torch.ones(len(rows), logits.shape[1], dtype=torch.bool, device=logits.device)
    forbidden[:, :width] = ~allowed[:, :width]
    index = torch.tensor(rows, device=logits.device)
    logits[index] = logits[index].masked_fill(forbidden, float("-inf"))
    return logits
