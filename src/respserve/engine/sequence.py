"""One request's state inside the worker: its tokens, KV blocks, detokenizer, stop matcher and sampler row.

Its KV lives in the pool's blocks listed in `block_table` (block_manager.py); `num_computed` of its tokens
have theirs there. A decoding sequence has computed all but its last sampled token."""

from __future__ import annotations

import torch

from respserve.engine.detokenizer import IncrementalDetokenizer, Tokenizer
from respserve.engine.generation import (
    GenerationOutput,
    GenerationRequest,
    GenerationStatus,
    TokenLogprob,
    TopToken,
)
from respserve.engine.sampler import RowLogprobs, SamplingRow
from respserve.engine.stop_strings import StopStringMatcher
from respserve.engine.structured_output import GrammarCompiler
from respserve.engine.token_text import TokenTexts
from respserve.engine.vision import ImageEmbeddings, RopePositions


class Sequence:
    def __init__(
        self,
        request: GenerationRequest,
        tokenizer: Tokenizer,
        vocab_size: int,
        grammars: GrammarCompiler,
        token_texts: TokenTexts,
    ) -> None:
        params = request.sampling
        self._token_texts = token_texts
        self.request = request
        self.output_ids: list[int] = []
        self.token_ids: list[int] = list(request.prompt_token_ids)  # the prompt, then the output
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []
        self.num_computed = 0
        self.cached_tokens = 0  # prompt tokens whose KV came from the prefix cache
        vision = request.vision
        self.hash_salt = None if vision is None else (vision.first_image_token, vision.hash_salt)
        # Gemma 3: each image's placeholder positions [first, last), prefilled whole in one chunk (scheduler.py)
        self.image_spans: tuple[tuple[int, int], ...] = () if vision is None else vision.bidirectional_spans
        self.images: ImageEmbeddings | None = None  # set at admission (worker.py), kept while it lives
        self.rope_positions: RopePositions | None = None  # likewise, for M-RoPE models' image prompts
        self.started = False  # admitted once (it no longer counts as queued, even if preempted later)
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
            logit_bias=params.logit_bias,
            matcher=grammars.matcher(params.grammar) if params.grammar else None,
            top_logprobs=params.logprobs,
        )

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.request.prompt_token_ids

    def append(
        self, token_id: int, eos_token_ids: frozenset[int], logprobs: RowLogprobs | None = None
    ) -> GenerationOutput:
        """Adds a sampled token and returns the text it made safe to emit, with the status after it."""
        self.output_ids.append(token_id)
        self.token_ids.append(token_id)
        counts = self.sampling_row.token_counts
        if counts is not None and token_id < counts.shape[0]:
            counts[token_id] += 1
        matcher = self.sampling_row.matcher
        grammar_done = False
        if matcher is not None:
            matcher.consume_token(token_id)
            grammar_done = matcher.is_stopped()
        if token_id in eos_token_ids:
            self.status = GenerationStatus.END_OF_SEQUENCE
            return self.output(self._finish_text(self._detokenizer.flush()))
        text = self._stop.feed(self._detokenizer.push(token_id))
        if self._stop.stopped:
            self.status = GenerationStatus.END_OF_SEQUENCE
        elif grammar_done:
            self.status = GenerationStatus.END_OF_SEQUENCE
            text += self._finish_text(self._detokenizer.flush())
        elif len(self.output_ids) >= self.request.sampling.max_tokens:
            self.status = GenerationStatus.MAXIMUM_LENGTH
            text += self._finish_text(self._detokenizer.flush())
        return self.output(text, logprobs=[self._token_logprob(token_id, logprobs)] if logprobs else [])

    def output(
        self, text: str = "", error: str | None = None, logprobs: list[TokenLogprob] | None = None
    ) -> GenerationOutput:
        return GenerationOutput(
            request_id=self.request_id,
            text=text,
            final_status=self.status,
            prompt_tokens=len(self.prompt_token_ids),
            cached_tokens=self.cached_tokens,
            output_tokens=len(self.output_ids),
            error=error,
            logprobs=logprobs or [],
        )

    def _token_logprob(self, token_id: int, logprobs: RowLogprobs) -> TokenLogprob:
        token, raw = self._token_texts.text_and_bytes(token_id)
        top = []
        for top_id, top_logprob in zip(logprobs.top_ids, logprobs.top_logprobs, strict=True):
            top_token, top_raw = self._token_texts.text_and_bytes(top_id)
            top.append(TopToken(token=top_token, bytes=top_raw, logprob=top_logprob))
        return TokenLogprob(token=token, bytes=raw, logprob=logprobs.logprob, top=top)

    def _finish_text(self, tail: str) -> str:
        text = self._stop.feed(tail)
        if self._stop.stopped:
            self.status = GenerationStatus.END_OF_SEQUENCE
            return text
        return text + self._stop.flush()
