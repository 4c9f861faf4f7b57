"""Decode steps at static shapes (engine/cuda_graphs.py).

On the CPU the static padded path runs eagerly (no capture) beside the normal one, step after step over the
same block tables, each on its own pool pre-filled with NaN: a padded row that read anything but the zero
block, or wrote anywhere but the scratch block, would change a logit or leave a NaN where none may be. The
gpu-marked test captures and replays the same steps and compares them with the eager CUDA path and the CPU."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from conftest import STALE, TINY_LAYERS, TextTokens, unwritten
from transformers import Qwen3Config, Qwen3ForCausalLM

from respserve.engine.block_manager import NULL_BLOCK, BlockManager
from respserve.engine.cuda_graphs import (
    DecodeGraphs,
    batch_buckets,
    graphs_apply,
    is_pure_decode,
    static_layout,
    width_bucket,
)
from respserve.engine.kv_cache import PagedKVCache
from respserve.engine.model_runner import ModelRunner, StepInputs
from respserve.engine.paged_attention import DecodeAttention
from respserve.engine.scheduler import Chunk

BLOCK = 4
NUM_BLOCKS = 32


def _model() -> Any:
    config = Qwen3Config(
        vocab_size=256,
        **TINY_LAYERS,
        head_dim=16,
        max_position_embeddings=256,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=6,
        use_sliding_window=True,
    )
    torch.manual_seed(0)
    return Qwen3ForCausalLM(config).eval()


def _pool(model: Any, device: str, scratch: bool = False, attention: DecodeAttention = "gather") -> PagedKVCache:
    zeroed = attention == "flex"
    cache = PagedKVCache(model.config, NUM_BLOCKS, BLOCK, torch.float32, torch.device(device), 1, scratch, zeroed)
    for pool in (*cache.keys, *cache.values):  # what a slot read before it is written would bring
        pool[BLOCK:].fill_(unwritten(attention))
    return cache


def _decode(sequences: list[TextTokens]) -> list[Chunk]:
    return [Chunk(seq, len(seq.token_ids) - 1, len(seq.token_ids)) for seq in sequences]  # type: ignore[arg-type]


def _run_in_lockstep(runners: list[ModelRunner], graphs: DecodeGraphs, atol: float, rtol: float) -> set[int]:
    """Runs three sequences of different lengths through prefill and decode steps on every runner (a fourth
    joins mid-way in a mixed step, and the first leaves), greedy on the first runner's logits, and checks the
    others against it. Returns every block a sequence held."""
    blocks = BlockManager(runners[-1].cache.managed_blocks, BLOCK)
    torch.manual_seed(5)
    sequences = [TextTokens(torch.randint(0, 256, (length,)).tolist()) for length in (5, 13, 2)]
    late = TextTokens(torch.randint(0, 256, (7,)).tolist())
    held: set[int] = set()
    padded_logits: list[torch.Tensor] = []
    chunks = [Chunk(seq, 0, len(seq.token_ids)) for seq in sequences]  # type: ignore[arg-type]
    for seq in sequences:
        assert blocks.allocate(seq)
    for index in range(16):
        step = StepInputs.of(chunks)
        logits = [runner.run(chunks) for runner in runners]
        for other in logits[1:]:
            torch.testing.assert_close(other.cpu(), logits[0].cpu(), atol=atol, rtol=rtol)
        rows = len(chunks)
        if is_pure_decode(step):  # the static path's padded rows read only zeros: finite logits
            width = width_bucket(max(end for _, end in step.spans), BLOCK)
            batch = next(size for size in graphs.buckets if size >= rows)
            static = graphs.statics[batch, width]
            assert static.logits is not None and torch.isfinite(static.logits).all()
            # Padded rows read only the zero block and write only the scratch block.
            assert (static_layout(static, BLOCK).single_slots[rows:] // BLOCK == NULL_BLOCK).all()
            assert (static.slot_mapping[rows:] // BLOCK == graphs.cache.scratch_block).all()
            # Token 0 at position 0 over zeros, in any step and bucket: the same logits every time.
            padded_logits.extend(static.logits[rows:].cpu())
            expected = padded_logits[0].expand(len(padded_logits), -1)
            torch.testing.assert_close(torch.stack(padded_logits), expected, atol=atol, rtol=rtol)
        scratch = graphs.cache.scratch_block
        for seq in {id(chunk.sequence): chunk.sequence for chunk in chunks}.values():
            assert scratch not in seq.block_table
            held.update(seq.block_table)
        for seq, row in zip([chunk.sequence for chunk in chunks if chunk.samples], logits[0], strict=True):
            seq.token_ids.append(int(row.argmax()))
            assert blocks.grow(seq, len(seq.token_ids))  # type: ignore[arg-type]
        if index == 8:  # a prompt arrives: one mixed step, then decode steps of four rows
            assert blocks.allocate(late)
            chunks = [*_decode(sequences), Chunk(late, 0, len(late.token_ids))]  # type: ignore[arg-type]
            sequences.append(late)
            continue
        if index == 12:  # the first sequence finishes: three rows again
            blocks.free(sequences.pop(0))  # type: ignore[arg-type]
        chunks = _decode(sequences)
    return held


def test_batch_and_width_buckets() -> None:
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert batch_buckets(1) == [1]
    # Whole blocks, rounded up to a power of two.
    assert [width_bucket(tokens, 16) for tokens in (1, 16, 17, 33, 64, 65, 1000)] == [1, 1, 2, 4, 4, 8, 64]
    assert graphs_apply(True, torch.device("cuda"), 1)
    assert not graphs_apply(True, torch.device("cpu"), 1)
    assert not graphs_apply(True, torch.device("cuda"), 2)  # tensor parallelism stays eager
    assert not graphs_apply(False, torch.device("cuda"), 1)


def test_the_scratch_block_is_carved_from_the_pool_and_never_handed_out() -> None:
    model = _model()
    plain, scratched = _pool(model, "cpu"), _pool(model, "cpu", scratch=True)
    assert plain.scratch_block is None and plain.managed_blocks == NUM_BLOCKS
    assert scratched.scratch_block == NUM_BLOCKS - 1 and scratched.managed_blocks == NUM_BLOCKS - 1
    assert scratched.num_bytes == plain.num_bytes  # within the same --kv-cache-memory budget
    blocks = BlockManager(scratched.managed_blocks, BLOCK)
    everything = TextTokens(list(range((NUM_BLOCKS - 2) * BLOCK)))  # every block but the zero one
    assert blocks.allocate(everything) and blocks.num_available == 0
    assert NULL_BLOCK not in everything.block_table and scratched.scratch_block not in everything.block_table
    with pytest.raises(ValueError, match="scratch"):
        DecodeGraphs(model, plain, max_batch=8)


@pytest.mark.parametrize("attention", ["gather", "flex"])
def test_static_padded_decode_steps_match_the_eager_path_on_the_cpu(attention: DecodeAttention) -> None:
    model = _model()
    normal = ModelRunner(model, _pool(model, "cpu"), torch.device("cpu"))
    cache = _pool(model, "cpu", scratch=True, attention=attention)
    graphs = DecodeGraphs(model, cache, max_batch=8, capture=False, decode_attention=attention)
    static = ModelRunner(model, graphs.cache, torch.device("cpu"), graphs=graphs)
    held = _run_in_lockstep([normal, static], graphs, atol=1e-5, rtol=1e-5)
    # Three rows in bucket 4 at widths 4 and 8 blocks, four rows unpadded, and after a mixed (eager) step.
    assert {(4, 4), (4, 8)} <= set(graphs.statics)
    assert all(static.graph is None for static in graphs.statics.values())  # eager: nothing captured
    # The zero block is still zeros; the scratch block took the padded rows' writes; nothing else changed.
    cache, scratch = graphs.cache, graphs.cache.scratch_block
    assert scratch is not None
    for pool in (*cache.keys, *cache.values):
        blocks = pool.view(NUM_BLOCKS, BLOCK, -1)
        assert not blocks[NULL_BLOCK].any()
        assert torch.isfinite(blocks[scratch, 0]).all()
        untouched = [block for block in range(NUM_BLOCKS) if block not in held | {NULL_BLOCK, scratch}]
        assert blocks[untouched].isnan().all() if attention == "gather" else (blocks[untouched] == STALE).all()


def test_steps_with_prefill_chunks_stay_eager() -> None:
    prompt, decoding = TextTokens([1, 2, 3]), TextTokens([4, 5])
    prompt.block_table, decoding.block_table = [1], [2]
    mixed = [Chunk(decoding, 1, 2), Chunk(prompt, 0, 3)]  # type: ignore[arg-type]
    assert not is_pure_decode(StepInputs.of(mixed))
    assert is_pure_decode(StepInputs.of([Chunk(decoding, 1, 2), Chunk(prompt, 2, 3)]))  # type: ignore[arg-type]
    unfinished = [Chunk(prompt, 0, 1)]  # one token, but the prompt goes on: it does not sample
    assert not is_pure_decode(StepInputs.of(unfinished))  # type: ignore[arg-type]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where capturing fails")
def test_a_failed_capture_leaves_decode_steps_eager(caplog: pytest.LogCaptureFixture) -> None:
    model = _model()
    normal = ModelRunner(model, _pool(model, "cpu"), torch.device("cpu"))
    graphs = DecodeGraphs(model, _pool(model, "cpu", scratch=True), max_batch=8)  # capture on, no CUDA here
    runner = ModelRunner(model, graphs.cache, torch.device("cpu"), graphs=graphs)
    blocks = BlockManager(graphs.cache.managed_blocks, BLOCK)
    sequences = [TextTokens([3, 1, 4, 1, 5]), TextTokens([9, 2])]
    for seq in sequences:
        assert blocks.allocate(seq)
    prefill = [Chunk(seq, 0, len(seq.token_ids)) for seq in sequences]  # type: ignore[arg-type]
    torch.testing.assert_close(runner.run(prefill), normal.run(prefill))
    for seq in sequences:
        seq.token_ids.append(7)
        assert blocks.grow(seq, len(seq.token_ids))  # type: ignore[arg-type]
    torch.testing.assert_close(runner.run(_decode(sequences)), normal.run(_decode(sequences)))
    assert "capturing a decode step failed" in caplog.text and not graphs.statics
    torch.testing.assert_close(runner.run(_decode(sequences)), normal.run(_decode(sequences)))  # no retry


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("attention", ["gather", "flex"])
def test_captured_decode_graphs_match_the_eager_cuda_path_and_the_cpu(attention: DecodeAttention) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 on both sides, so the logits compare closely
    cpu_model = _model()
    cuda_model = copy.deepcopy(cpu_model).to("cuda")
    cpu = ModelRunner(cpu_model, _pool(cpu_model, "cpu"), torch.device("cpu"))
    eager_pool = _pool(cuda_model, "cuda", attention=attention)
    eager = ModelRunner(cuda_model, eager_pool, torch.device("cuda"), decode_attention=attention)
    cache = _pool(cuda_model, "cuda", scratch=True, attention=attention)
    graphs = DecodeGraphs(cuda_model, cache, max_batch=8, decode_attention=attention)
    captured = ModelRunner(cuda_model, graphs.cache, torch.device("cuda"), graphs=graphs, decode_attention=attention)
    _run_in_lockstep([cpu, eager, captured], graphs, atol=2e-4, rtol=1e-4)
    assert {(4, 4), (4, 8)} <= set(graphs.statics)
    assert all(static.graph is not None for static in graphs.statics.values())
    for pool in (*cache.keys, *cache.values):
        assert not pool.view(NUM_BLOCKS, BLOCK, -1)[NULL_BLOCK].any()


def test_the_flag_turns_graphs_off_and_they_are_on_by_default() -> None:
    from respserve.cli import _parser
    from respserve.config import load_settings

    off = vars(_parser().parse_args(["serve", "--no-cuda-graphs"]))["cuda_graphs"]
    default = vars(_parser().parse_args(["serve"]))["cuda_graphs"]
    assert load_settings(cuda_graphs=off).cuda_graphs is False
    assert load_settings(cuda_graphs=default).cuda_graphs is True
