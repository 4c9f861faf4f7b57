"""The pieces of the text path that need no server: detokenizer, stop strings, sampler, against the real
tokenizer of the default model."""

from __future__ import annotations

import pytest
import torch
from conftest import RunningServer

from respserve.engine.detokenizer import IncrementalDetokenizer
from respserve.engine.sampler import Sampler, SamplingRow
from respserve.engine.stop_strings import StopStringMatcher

MIXED = "Crème brûlée à Paris, 東京タワー and 🙂🚀 — naïve façade ✓"


@pytest.fixture(scope="module")
def tokenizer(server: RunningServer):
    return server.state.default_model.worker.pipeline.tokenizer


def test_detokenizer_never_splits_characters(tokenizer) -> None:
    ids = tokenizer.encode(MIXED, add_special_tokens=False)
    assert len(ids) > len(MIXED.split())  # multi-byte characters span several tokens
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids=tokenizer.encode("Say:"))
    deltas = [detokenizer.push(token) for token in ids] + [detokenizer.flush()]
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == MIXED
    assert "" in deltas  # some tokens end mid-character and are held back


def test_detokenizer_flushes_an_incomplete_character(tokenizer) -> None:
    ids = tokenizer.encode("🙂", add_special_tokens=False)
    assert len(ids) > 1
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids=[])
    assert detokenizer.push(ids[0]) == ""
    assert detokenizer.flush() == "\ufffd"


@pytest.mark.parametrize(
    ("chunks", "emitted", "stopped"),
    [
        (["Hello wor", "ld. Bye"], "Hello ", True),
        (["abc", "def"], "abcdef", False),
        (["The end", "ing is near"], "The ending is near", False),
        (["x<", "/s", ">y"], "x", True),
    ],
)
def test_stop_strings_hold_back_partial_matches(chunks: list[str], emitted: str, stopped: bool) -> None:
    matcher = StopStringMatcher(("world", "</s>", "endgame"))
    out = ""
    for chunk in chunks:
        out += matcher.feed(chunk)
        if matcher.stopped:
            break
    if not matcher.stopped:
        out += matcher.flush()
    assert out == emitted
    assert matcher.stopped is stopped


def _row(**overrides) -> SamplingRow:
    values = dict(
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        frequency_penalty=0.0,
        presence_penalty=0.0,
        generator=None,
        token_counts=None,
    )
    values.update(overrides)
    return SamplingRow(**values)


@pytest.fixture(scope="module")
def sampler(server: RunningServer) -> Sampler:
    return Sampler(server.state.default_model.worker.pipeline.grammars)


def test_sampler_greedy_topk_topp_and_seeds(sampler: Sampler) -> None:
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(0))
    best = logits.argmax(dim=-1)
    rows = [_row(temperature=0.0), _row(top_k=1), _row(top_p=1e-6), _row(temperature=0.7)]
    picked = sampler.sample(logits, rows).tokens
    assert picked[:3] == best[:3].tolist()

    def seeded(batch_position: int) -> int:
        batch = torch.randn(3, 100)
        batch[batch_position] = logits[0]
        rows = [_row() for _ in range(3)]
        rows[batch_position] = _row(generator=torch.Generator().manual_seed(99))
        return sampler.sample(batch, rows).tokens[batch_position]

    assert seeded(0) == seeded(2)


def _uniform(generator: torch.Generator) -> float:
    """The draw the sampler makes for a seeded row."""
    return float(torch.rand(1, generator=generator, dtype=torch.float64).clamp_(max=1.0 - 1e-7).float())


def _full_sort_draw(logits: torch.Tensor, top_k: int, top_p: float, uniform: float) -> int:
    """The textbook rule over the whole sorted vocabulary: top-k, renormalise, keep the smallest prefix whose
    mass reaches top_p, draw by inverse CDF."""
    values, index = logits.sort(descending=True)
    if top_k:
        values = values[:top_k]
    probs = values.softmax(dim=-1)
    probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, 0.0)
    cumulative = probs.cumsum(dim=-1)
    picked = int(torch.searchsorted(cumulative, torch.tensor([uniform * float(cumulative[-1])])))
    return int(index[min(picked, len(probs) - 1)])


def test_truncated_sampling_draws_what_a_full_sort_of_the_vocabulary_draws(sampler: Sampler) -> None:
    """Rows whose nucleus lies among the sampler's candidates (peaked logits) and rows whose nucleus is wider
    (nearly flat ones, for which it sorts after all), mixed with top-k rows in one batch."""
    generator = torch.Generator().manual_seed(7)
    vocab, draws = 5000, 64
    settings = [(0, 0.9, 6.0), (0, 0.5, 0.3), (40, 1.0, 1.0), (300, 0.8, 0.5), (0, 0.95, 3.0)]
    rows, logits, expected = [], [], []
    for draw in range(draws):
        top_k, top_p, scale = settings[draw % len(settings)]
        row_logits = torch.randn(vocab, generator=generator) * scale
        uniform = _uniform(torch.Generator().manual_seed(draw))
        expected.append(_full_sort_draw(row_logits, top_k, top_p, uniform))
        rows.append(_row(top_k=top_k, top_p=top_p, generator=torch.Generator().manual_seed(draw)))
        logits.append(row_logits)
    picked = sampler.sample(torch.stack(logits), rows).tokens
    # Exact but for a uniform within float rounding of a boundary between two tokens' cumulative masses.
    assert sum(a == b for a, b in zip(picked, expected, strict=True)) >= draws - 1


def test_untruncated_sampling_follows_the_softmax(sampler: Sampler) -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    rows = [_row(temperature=0.8, generator=torch.Generator().manual_seed(seed)) for seed in range(4000)]
    picked = torch.tensor(sampler.sample(logits.expand(len(rows), -1).clone(), rows).tokens)
    frequencies = torch.bincount(picked, minlength=len(logits)).float() / len(rows)
    torch.testing.assert_close(frequencies, (logits / 0.8).softmax(dim=-1), atol=0.03, rtol=0)


def test_sampler_penalties_push_repeated_tokens_down(sampler: Sampler) -> None:
    logits = torch.zeros(1, 10)
    logits[0, 3] = 1.0
    counts = torch.zeros(10)
    counts[3] = 2
    row = _row(temperature=0.0, frequency_penalty=1.0, token_counts=counts)
    assert sampler.sample(logits, [row]).tokens[0] != 3
