"""One request's state inside the worker: its tokens, detokenizer, stop matcher and sampler row.

Its KV cache is a row of the worker's `BatchKVCache`, not held here."""

from __future__ import annotations

import torch

from respserve.engine.detokenizer import IncrementalDetokenizer, Tokenizer
from respserve.engine.generation import GenerationOutput, GenerationRequest, GenerationStatus
from respserve.engine.sampler import SamplingRow
from respserve.engine.stop_strings import StopStringMatcher


class Sequence:
    def __init__(self, request: GenerationRequest, tokenizer: Tokenizer, vocab_size: int) -> None:
        params = request.sampling
        self.request = request
        self.output_ids: list[int] = []
        self.status = GenerationStatus.ACTIVE
        self.cancelled = False
        self._detokenizer = IncrementalDetokenizer(tokenizer, request.prompt_token_ids)
        self._stop = StopStringMatcher(params.stop)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device="cpu")
            generator.manual_seed(params.seed)
        penalised = params.frequency_penalty != 0.0 or params.presence_penalty != 0.0
        self.sampling_row = SamplingRow(
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            frequency_penalty=params.frequency_penalty,
            presence_penalty=params.presence_penalty,
            generator=generator,
            token_counts=torch.zeros(vocab_size) if penalised else None,
        )

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.request.prompt_token_ids

    @property
    def last_token_id(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_token_ids[-1]

    @property
    def length(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_ids)

    def append(self, token_id: int, eos_token_ids: frozenset[int]) -> GenerationOutput:
        """Adds a sampled token and returns the text it made safe to emit, with the status after it."""
        self.output_ids.append(token_id)
        counts = self.sampling_row.token_counts
        if counts is not None and token_id < counts.shape[0]:
            counts[token_id] += 1
        if token_id in eos_token_ids:
            self.status = GenerationStatus.END_OF_SEQUENCE
            text = self._finish_text(self._detokenizer.flush())
        else:
            text = self._stop.feed(self._detokenizer.push(token_id))
            if self._stop.stopped:
                self.status = GenerationStatus.END_OF_SEQUENCE
            elif len(self.output_ids) >= self.request.sampling.max_tokens:
                self.status = GenerationStatus.MAXIMUM_LENGTH
                text += self._finish_text(self._detokenizer.flush())
        return self.output(text)

    def output(self, text: str = "", error: str | None = None) -> GenerationOutput:
        return GenerationOutput(
            request_id=self.request_id,
            text=text,
            final_status=self.status,
            prompt_tokens=len(self.prompt_token_ids),
            output_tokens=len(self.output_ids),
            error=error,
        )

    def _finish_text(self, tail: str) -> str:
        text = self._stop.feed(tail)
        if self._stop.stopped:
            self.status = GenerationStatus.END_OF_SEQUENCE
            return text
        return text + self._stop.flush()
