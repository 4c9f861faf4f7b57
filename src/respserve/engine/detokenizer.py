"""Incremental detokenization: token ids in, text deltas out, never splitting a UTF-8 character."""

from __future__ import annotations

from typing import Protocol

# Prompt tokens decoded ahead of the first generated one, so tokenizers that drop a leading space when
# decoding a lone token (SentencePiece) still produce it.
_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class Tokenizer(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Decodes a window `tokens[prefix:]` against `tokens[prefix:read]`; the new suffix is the delta.

    A delta that ends in U+FFFD is a character whose bytes are still arriving: it is held back until
    the next token completes it. The concatenated deltas equal the decoded output.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self._tokens = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._tokens)

    def push(self, token_id: int) -> str:
        self._tokens.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is held back, at the end of generation (an incomplete character stays U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        decode = self._tokenizer.decode
        prefix_text = decode(self._tokens[self._prefix_offset : self._read_offset], skip_special_tokens=True)
        new_text = decode(self._tokens[self._prefix_offset :], skip_special_tokens=True)
        if len(new_text) <= len(prefix_text) or (new_text.endswith(_REPLACEMENT) and not final):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._tokens)
        return new_text[len(prefix_text) :]
