"""Decode rows attended through torch's flex attention, reading the paged pool in place (engine/flex_decode.py).

On the CPU flex attention compiles to C++ through inductor, the same code path that compiles to Triton on
CUDA: these tests check the block masks, the padding of rows and the choice of attention against the
gather-and-SDPA path. The model-level tests (test_paged_engine.py, test_cuda_graphs.py) run whole models
through it; the gpu-marked ones there run it on CUDA."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
from conftest import STALE, RunningServer, assert_same_greedy_tokens, decode_step, free_port, never_ends, serving
from transformers import Qwen3Config

from respserve.cli import _parser
from respserve.config import load_settings
from respserve.engine.block_manager import NULL_BLOCK
from respserve.engine.flex_decode import (
    decode_block_mask,
    flex_decode_attention,
    flex_decode_works,
    pad_rows,
    padded_rows,
)
from respserve.engine.kv_cache import PagedKVCache
from respserve.engine.paged_attention import build_step_layout, paged_attention, pick_decode_attention

CPU = torch.device("cpu")


def _attend(attention: str, query: torch.Tensor, pool: list[torch.Tensor], layout_args: tuple, window: int | None):
    tables, spans, block_size = layout_args
    layout = build_step_layout(tables, spans, block_size, CPU, decode_attention=attention)  # type: ignore[arg-type]
    with torch.inference_mode():
        out, _ = paged_attention(torch.nn.Module(), query, *pool, None, 0.3, sliding_window=window, paged_step=layout)
    return out


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (9, 3)])
@pytest.mark.parametrize("window", [None, 5])
def test_flex_attends_as_gathering_and_sdpa_do(heads: int, kv_heads: int, window: int | None) -> None:
    # Five rows (padded to eight): one token, a partial block, a whole block, many blocks, a short one.
    lengths = [1, 7, 16, 33, 4]
    pool, tables, spans, block_size = decode_step(lengths, kv_heads, garbage=STALE)
    query = torch.randn(1, heads, len(lengths), 16)
    gathered = _attend("gather", query, pool, (tables, spans, block_size), window)
    flex = _attend("flex", query, pool, (tables, spans, block_size), window)
    torch.testing.assert_close(flex, gathered, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("full_blocks", [True, False], ids=["cpu-layout", "cuda-layout"])
@pytest.mark.parametrize("window", [None, 5])
def test_both_mask_layouts_attend_as_gathering_and_sdpa_do(full_blocks: bool, window: int | None) -> None:
    # The CPU lists a row's inner blocks as full, CUDA lists every block as partial: the same attention.
    lengths = [1, 7, 16, 33, 4]
    pool, tables, spans, block_size = decode_step(lengths, kv_heads=2, garbage=STALE)
    query = torch.randn(1, 4, len(lengths), 16)
    gathered = _attend("gather", query, pool, (tables, spans, block_size), window)
    width = max(len(table) for table in tables)
    padded = torch.tensor([table + [NULL_BLOCK] * (width - len(table)) for table in tables])
    padded, padded_lengths = pad_rows(padded, torch.tensor(lengths))
    num_blocks = pool[0].shape[0] // block_size
    mask = decode_block_mask(padded, padded_lengths, block_size, num_blocks, window, full_blocks=full_blocks)
    assert (mask.full_kv_num_blocks is not None) == full_blocks
    with torch.inference_mode():
        flex = flex_decode_attention(query[0].transpose(0, 1), pool[0], pool[1], mask, 0.3)
    torch.testing.assert_close(flex, gathered[0], atol=2e-6, rtol=1e-5)


def test_a_decode_row_beside_a_prefill_chunk_goes_through_flex() -> None:
    pool, tables, _, block_size = decode_step([9, 12], kv_heads=2, garbage=STALE)
    spans = [(8, 9), (0, 12)]  # a decode row, then a whole prompt's chunk
    query = torch.randn(1, 4, 13, 16)
    gathered = _attend("gather", query, pool, (tables, spans, block_size), None)
    torch.testing.assert_close(_attend("flex", query, pool, (tables, spans, block_size), None), gathered)


def test_rows_are_padded_to_a_power_of_two_with_rows_reading_the_zero_block() -> None:
    assert [padded_rows(rows) for rows in (1, 2, 3, 5, 8, 33, 64)] == [1, 2, 4, 8, 8, 64, 64]
    tables, lengths = pad_rows(torch.tensor([[3, 4], [5, NULL_BLOCK], [6, 7]]), torch.tensor([20, 9, 31]))
    assert tables.shape == (4, 2) and (tables[3] == NULL_BLOCK).all() and lengths.tolist() == [20, 9, 31, 1]
    unchanged = torch.tensor([[1]]), torch.tensor([3])
    assert pad_rows(*unchanged) == unchanged


def test_a_pool_read_by_flex_is_zeroed_when_made() -> None:
    config = Qwen3Config(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    cache = PagedKVCache(config, num_blocks=4, block_size=4, dtype=torch.float32, device=CPU, zeroed=True)
    assert all(not pool.any() for pool in (*cache.keys, *cache.values))


def test_the_decode_attention_is_chosen_from_the_setting_and_the_device() -> None:
    config = Qwen3Config(num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    assert flex_decode_works(CPU, torch.float32, heads=4, kv_heads=2, head_dim=16)
    assert pick_decode_attention("auto", CPU, torch.float32, cpu_kernel=True, text_config=config) == "kernel"
    assert pick_decode_attention("auto", CPU, torch.float32, cpu_kernel=False, text_config=config) == "gather"
    assert pick_decode_attention("flex", CPU, torch.float32, cpu_kernel=True, text_config=config) == "flex"
    assert pick_decode_attention("gather", CPU, torch.float32, cpu_kernel=True, text_config=config) == "gather"
    assert vars(_parser().parse_args(["serve", "--decode-attention", "flex"]))["decode_attention"] == "flex"
    with pytest.raises(SystemExit):
        _parser().parse_args(["serve", "--decode-attention", "paged"])


def test_the_server_with_flex_decode_serves_the_same_greedy_tokens(tmp_path: Path, server: RunningServer) -> None:
    bodies = [
        {
            "input": f"Name a city, number {n}.",
            "temperature": 0,
            "max_output_tokens": 16,
            "logit_bias": never_ends(server),
            "include": ["message.output_text.logprobs"],
            "top_logprobs": 2,
        }
        for n in range(3)
    ]
    default = [httpx.post(f"{server.base_url}/v1/responses", json=body, timeout=120).json() for body in bodies]
    settings = load_settings(port=free_port(), data_dir=str(tmp_path), decode_attention="flex")
    for flex in serving(settings):
        worker = flex.state.default_model.worker
        assert worker._runner.decode_attention == "flex"
        for body, expected in zip(bodies, default, strict=True):
            got = httpx.post(f"{flex.base_url}/v1/responses", json=body, timeout=300).json()
            assert got["usage"]["output_tokens"] == 16
            assert_same_greedy_tokens(expected, got)
