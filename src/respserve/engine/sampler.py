"""Batched sampling: penalties, temperature, top-k, top-p and per-request seeds applied to a [B, V] tensor.

Every step is one tensor operation over the batch; only the uniform draw of a seeded row comes from its
own generator, so a seeded request samples the same tokens alone or inside any batch.

Nothing sorts the vocabulary in the common cases. A row without top-k or top-p (OpenAI's defaults) draws by
inverse CDF over its unsorted probabilities; a truncated row looks only at its `CANDIDATES` most likely
tokens (or its top_k, if larger), which hold its whole nucleus unless its distribution is nearly flat, and
only then is the vocabulary sorted. Measured on the 2-core CPU (SmolLM2's 49,152 tokens, one thread): a
full sort of 32 rows takes 95 ms, more than the decode step itself, and 2.9 ms for one row; top-256 of 32
rows 3.6 ms, softmax + cumsum + search 2.1 ms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from respserve.engine.structured_output import GrammarCompiler, apply_grammar_masks

CANDIDATES = 256  # tokens a top-p row samples among before the vocabulary is sorted


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
        tokens = logits.argmax(dim=-1)
        if all(row.temperature == 0.0 for row in rows):
            return tokens.cpu()
        temperature = torch.tensor([row.temperature or 1.0 for row in rows], device=logits.device, dtype=logits.dtype)
        scaled = logits / temperature.unsqueeze(1)
        uniforms = self._uniforms(rows).to(logits.device)  # one per row, greedy ones too: seeded draws stay aligned
        vocab = logits.shape[1]
        truncated = [0 < row.top_k < vocab or row.top_p < 1.0 for row in rows]
        whole = [index for index, row in enumerate(rows) if row.temperature != 0.0 and not truncated[index]]
        if whole:
            tokens[whole] = _draw(scaled[whole].softmax(dim=-1), uniforms[whole])
        cut = [index for index, row in enumerate(rows) if row.temperature != 0.0 and truncated[index]]
        if cut:
            tokens[cut] = _sample_truncated(scaled[cut], [rows[index] for index in cut], uniforms[cut])
        return tokens.cpu()

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

    def _uniforms(self, rows: list[SamplingRow]) -> torch.Tensor:
        draws = [torch.rand(1, generator=row.generator or self._default_generator, dtype=torch.float64) for row in rows]
        # Just below 1 so searchsorted never runs past the last kept token.
        return torch.cat(draws).clamp_(max=1.0 - 1e-7).float()


def _sample_truncated(scaled: torch.Tensor, rows: list[SamplingRow], uniforms: torch.Tensor) -> torch.Tensor:
    """Top-k, then top-p over what is left (renormalised), among each row's most likely tokens."""
    vocab = scaled.shape[1]
    top_k = torch.tensor([row.top_k if 0 < row.top_k < vocab else 0 for row in rows], device=scaled.device)
    values, index = scaled.topk(min(vocab, max(CANDIDATES, int(top_k.max()))), dim=-1)
    probs = _candidate_probs(scaled, values, top_k)
    top_p = torch.tensor([row.top_p for row in rows], device=scaled.device, dtype=probs.dtype)
    tokens = _draw_nucleus(probs, index, top_p, uniforms)
    wide = ((top_k == 0) & (probs.sum(dim=-1) < top_p)).nonzero().flatten().tolist()
    if wide:  # a nearly flat row: its nucleus is wider than its candidates, so its whole vocabulary is sorted
        values, index = scaled[wide].sort(dim=-1, descending=True)
        probs = _candidate_probs(scaled[wide], values, top_k[wide])
        tokens[wide] = _draw_nucleus(probs, index, top_p[wide], uniforms[wide])
    return tokens


def _draw_nucleus(
    probs: torch.Tensor, index: torch.Tensor, top_p: torch.Tensor, uniforms: torch.Tensor
) -> torch.Tensor:
    """Draws among the smallest prefix of candidates (descending) whose mass reaches top_p (the first always
    stays); `index` maps candidates to token ids."""
    nucleus = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p[:, None], 0.0)
    return index.gather(1, _draw(nucleus, uniforms).unsqueeze(1)).squeeze(1)


def _candidate_probs(scaled: torch.Tensor, values: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Probabilities of the candidates `values` (a row's most likely logits, descending): a row with a top_k
    renormalised over its first top_k, any other row over the whole vocabulary (`scaled`)."""
    limited = top_k > 0
    positions = torch.arange(values.shape[1], device=values.device)
    kept = values.masked_fill(limited[:, None] & (positions[None, :] >= top_k[:, None]), float("-inf"))
    total = torch.where(limited, kept.logsumexp(dim=-1), scaled.logsumexp(dim=-1))
    return (kept - total[:, None]).exp()


def _draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One index per row by inverse CDF: the first whose cumulative probability passes the row's uniform."""
    cumulative = probs.cumsum(dim=-1)
    picked = torch.searchsorted(cumulative, (uniforms * cumulative[:, -1]).unsqueeze(1))
    return picked.clamp_(max=probs.shape[1] - 1).squeeze(1)
