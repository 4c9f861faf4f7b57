"""Batched sampling: penalties, temperature, top-k, top-p and per-request seeds applied to a [B, V] tensor.

Every step is one tensor operation over the batch; only the uniform draw of a seeded row comes from its
own generator, so a seeded request samples the same tokens alone or inside any batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from respserve.engine.structured_output import GrammarCompiler, apply_grammar_masks


@dataclass
class SamplingRow:
    """One sequence's sampling state, as the sampler needs it."""

    temperature: float
    top_p: float
    top_k: int
    frequency_penalty: float
    presence_penalty: float
    generator: torch.Generator | None
    token_counts: torch.Tensor | None  # [V] counts of generated tokens, only when a penalty is set
    logit_bias: tuple[tuple[int, float], ...] = ()
    matcher: Any = None  # an llguidance matcher when the output follows a grammar
    top_logprobs: int | None = None  # None: no logprobs for this row


@dataclass(frozen=True)
class RowLogprobs:
    """The sampled token's log-probability and the `n` most likely tokens, as ids."""

    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass(frozen=True)
class Sample:
    tokens: list[int]
    logprobs: list[RowLogprobs | None]


class Sampler:
    def __init__(self, grammars: GrammarCompiler) -> None:
        self._grammars = grammars
        self._default_generator = torch.Generator(device="cpu")
        self._default_generator.seed()

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> Sample:
        """logits: [B, V] for the last position of each row."""
        logits = logits.float()
        tokens = self._pick(logits, rows)
        return Sample(tokens=tokens.tolist(), logprobs=self._logprobs(logits, tokens, rows))

    def _pick(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        logits = self._apply_logit_bias(self._apply_penalties(logits, rows), rows)
        matchers = [row.matcher for row in rows]
        if any(matcher is not None for matcher in matchers):
            logits = apply_grammar_masks(logits, matchers, self._grammars.tokenizer.vocab_size)
        greedy = torch.tensor([row.temperature == 0.0 for row in rows], device=logits.device)
        if bool(greedy.all()):
            return logits.argmax(dim=-1).cpu()

        temperature = torch.tensor([row.temperature or 1.0 for row in rows], device=logits.device, dtype=logits.dtype)
        scaled = logits / temperature.unsqueeze(1)
        sorted_logits, sorted_index = scaled.sort(dim=-1, descending=True)
        sorted_logits = self._mask_top_k(sorted_logits, rows)
        probs = self._mask_top_p(sorted_logits.softmax(dim=-1), rows)
        cumulative = probs.cumsum(dim=-1)
        uniform = self._uniforms(rows).to(logits.device) * cumulative[:, -1]
        picked = torch.searchsorted(cumulative, uniform.unsqueeze(1)).clamp_(max=probs.shape[1] - 1)
        sampled = sorted_index.gather(1, picked).squeeze(1)
        return torch.where(greedy, logits.argmax(dim=-1), sampled).cpu()

    @staticmethod
    def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, rows: list[SamplingRow]) -> list[RowLogprobs | None]:
        """Log-probabilities of the model's own distribution (before penalties, temperature or grammar)."""
        wanted = [row for row, params in enumerate(rows) if params.top_logprobs is not None]
        if not wanted:
            return [None] * len(rows)
        logprobs = torch.log_softmax(logits[wanted], dim=-1).cpu()
        most = max(rows[row].top_logprobs or 0 for row in wanted)
        top_values, top_ids = logprobs.topk(most, dim=-1) if most else (logprobs[:, :0], logprobs[:, :0].long())
        result: list[RowLogprobs | None] = [None] * len(rows)
        for index, row in enumerate(wanted):
            n = rows[row].top_logprobs or 0
            result[row] = RowLogprobs(
                logprob=float(logprobs[index, int(tokens[row])]),
                top_ids=top_ids[index, :n].tolist(),
                top_logprobs=top_values[index, :n].tolist(),
            )
        return result

    @staticmethod
    def _apply_logit_bias(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        entries = [(row, token, bias) for row, params in enumerate(rows) for token, bias in params.logit_bias]
        if not entries:
            return logits
        row_index, token_index, biases = zip(*entries, strict=True)
        bias = torch.zeros_like(logits)
        bias[list(row_index), list(token_index)] = torch.tensor(biases, dtype=logits.dtype, device=logits.device)
        return logits + bias

    def _apply_penalties(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        if all(row.token_counts is None for row in rows):
            return logits
        counts = torch.stack(
            [row.token_counts if row.token_counts is not None else torch.zeros_like(logits[0]) for row in rows]
        ).to(logits.device)
        frequency = torch.tensor([row.frequency_penalty for row in rows], device=logits.device).unsqueeze(1)
        presence = torch.tensor([row.presence_penalty for row in rows], device=logits.device).unsqueeze(1)
        return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)

    @staticmethod
    def _mask_top_k(sorted_logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        vocab = sorted_logits.shape[1]
        top_k = torch.tensor([row.top_k if 0 < row.top_k < vocab else vocab for row in rows])
        if bool((top_k == vocab).all()):
            return sorted_logits
        positions = torch.arange(vocab).unsqueeze(0)
        beyond = (positions >= top_k.unsqueeze(1)).to(sorted_logits.device)
        return sorted_logits.masked_fill(beyond, float("-inf"))

    @staticmethod
    def _mask_top_p(probs: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        top_p = torch.tensor([row.top_p for row in rows], device=probs.device, dtype=probs.dtype)
        if bool((top_p >= 1.0).all()):
            return probs
        # Keep the smallest prefix whose mass reaches top_p; the first token always stays.
        mass_before = probs.cumsum(dim=-1) - probs
        return probs.masked_fill(mass_before >= top_p.unsqueeze(1), 0.0)

    def _uniforms(self, rows: list[SamplingRow]) -> torch.Tensor:
        draws = [torch.rand(1, generator=row.generator or self._default_generator, dtype=torch.float64) for row in rows]
        # Just below 1 so searchsorted never runs past the last kept token.
        return torch.cat(draws).clamp_(max=1.0 - 1e-7).float()
