"""respserve's CPU kernels (engine/kernels/*.cpp), built the way a server builds them: the bf16-weight
matmul against float64 references, which linears take it, the paged decode attention against the
gather-and-SDPA path it replaces, and what serves when they cannot be built."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from conftest import (
    KERNEL_DIR,
    RunningServer,
    assert_same_greedy_tokens,
    decode_step,
    free_port,
    needs_kernels,
    never_ends,
    serving,
)

from respserve.cli import _parser
from respserve.config import load_settings
from respserve.engine.fused_norms import FusedRMSNorm, fuse_rms_norms
from respserve.engine.packed_linear import (
    Bf16Linear,
    PackedLinear,
    pack_amx_tiles,
    pack_bf16_blocks,
    prepared_linear,
)
from respserve.engine.paged_attention import build_step_layout, paged_attention
from respserve.engine.text_pipeline import uses_cpu_kernels


def bf16_exact_linear(in_features: int, out_features: int, bias: bool = True, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(linear.weight.to(torch.bfloat16).float())
    return linear


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 8, 12, 13, 25, 31, 64, 200])  # passes of 6, 12 and AMX tiles
# 100 features: AMX pads K to whole tiles of 32; 1536: AMX takes 200 rows in groups of 96
@pytest.mark.parametrize(
    ("in_features", "out_features", "bias"),
    [(64, 48, True), (576, 40, False), (96, 200, True), (100, 24, True), (1536, 24, True)],
)
def test_the_bf16_kernel_computes_float32_products(rows: int, in_features: int, out_features: int, bias: bool) -> None:
    linear = bf16_exact_linear(in_features, out_features, bias)
    x = torch.randn(rows, in_features)
    weight, offset = linear.weight.detach().double(), linear.bias.detach().double() if bias else 0.0
    expected = x.double() @ weight.T + offset
    with torch.inference_mode():
        got = Bf16Linear(linear)(x)
    assert got.dtype == torch.float32 and got.shape == (rows, out_features)
    # float32 sums of in_features products: a few float32 steps of the result's size
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=in_features * 2e-7 * float(expected.abs().max()))


@needs_kernels
def test_a_rows_product_does_not_depend_on_the_rows_beside_it() -> None:
    module = Bf16Linear(bf16_exact_linear(576, 1000, seed=1))
    x = torch.randn(2, 9, 576)  # any leading shape, rows flattened
    with torch.inference_mode():
        batched = module(x)
        assert batched.shape == (2, 9, 1000)
        for row in range(9):
            assert torch.equal(module(x[1, row : row + 1]), batched[1, row : row + 1])
        assert torch.equal(module(x[:, :3].contiguous()), batched[:, :3])
        assert module(torch.empty(0, 576)).shape == (0, 1000)
        wide = Bf16Linear(bf16_exact_linear(1536, 40, seed=2))  # a prompt's rows: AMX takes them in groups
        rows = torch.randn(150, 1536)
        batched = wide(rows)
        for row in (0, 95, 96, 100, 149):
            assert torch.equal(wide(rows[row : row + 1]), batched[row : row + 1])


_PRODUCTS = """
import sys, torch
from pathlib import Path
from respserve.engine.cpu_kernels import load_cpu_kernels
from respserve.engine.packed_linear import Bf16Linear
assert load_cpu_kernels(Path(sys.argv[1]))
torch.manual_seed(5)
linear = torch.nn.Linear(576, 1000)
with torch.no_grad():
    linear.weight.copy_(linear.weight.to(torch.bfloat16).float())
with torch.inference_mode():
    products = [Bf16Linear(linear)(torch.randn(rows, 576)) for rows in (1, 6, 7, 12, 13, 32, 200)]
torch.save(products, sys.argv[2])
print(torch.ops.respserve.kernel_isa())
"""


@pytest.fixture(scope="module")
def products_by_path(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[torch.Tensor]]:
    """The kernel's products on every path this CPU has, each in a process of its own (the path is chosen
    once per process); computed once for the tests that compare them."""
    tmp_path = tmp_path_factory.mktemp("products")
    runs = {}
    for asked in ("", "avx512", "avx2"):
        out = tmp_path / f"products-{asked or 'default'}.pt"
        env = {**os.environ, "RESPSERVE_CPU_KERNEL_ISA": asked}
        done = subprocess.run(
            [sys.executable, "-c", _PRODUCTS, str(KERNEL_DIR), str(out)], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-2000:]
        runs[done.stdout.split()[-1]] = torch.load(out)
    assert "avx2" in runs  # RESPSERVE_CPU_KERNEL_ISA=avx2 is obeyed everywhere
    return runs


@needs_kernels
def test_the_avx512_and_avx2_paths_compute_the_same_bits(products_by_path: dict[str, list[torch.Tensor]]) -> None:
    runs = products_by_path
    if "avx512" not in runs:
        pytest.skip("this CPU has no AVX-512")
    for wide, narrow in zip(runs["avx512"], runs["avx2"], strict=True):
        assert torch.equal(wide, narrow)


@needs_kernels
def test_the_amx_path_computes_what_the_avx_paths_do_to_float32_rounding(
    products_by_path: dict[str, list[torch.Tensor]],
) -> None:
    """AMX sums the three bf16 parts of each activation apart, so its bits differ from the AVX paths'
    (which the float64 tests hold to float32 accuracy too), by a few float32 steps of the result."""
    runs = products_by_path
    if "amx" not in runs:
        pytest.skip("this CPU has no AMX")
    assert "avx512" in runs  # RESPSERVE_CPU_KERNEL_ISA=avx512 turns AMX off
    for tiles, vectors in zip(runs["amx"], runs["avx512"], strict=True):
        torch.testing.assert_close(tiles, vectors, rtol=0, atol=576 * 2e-7 * float(vectors.abs().max()))


@needs_kernels
@pytest.mark.parametrize("path", ["avx2", "avx512"])
def test_the_narrower_paths_pass_the_kernel_tests_on_a_wider_cpu(path: str) -> None:
    """This module's kernel tests again, in a pytest of their own with RESPSERVE_CPU_KERNEL_ISA=avx2 or
    avx512 (a CPU whose widest path is that one has just run them that way)."""
    order = ["avx2", "avx512", "amx"]
    if order.index(torch.ops.respserve.kernel_isa()) <= order.index(path):
        pytest.skip(f"this process runs the {torch.ops.respserve.kernel_isa()} path")
    tests = [
        "test_the_bf16_kernel_computes_float32_products",
        "test_a_rows_product_does_not_depend_on_the_rows_beside_it",
        "test_the_decode_kernel_attends_as_gathering_and_sdpa_do",
        "test_the_chunk_kernel_attends_as_gathering_and_sdpa_do",
        "test_the_chunk_kernel_holds_float32_accuracy_over_long_contexts",
        "test_the_decode_kernel_holds_float32_accuracy_over_long_contexts",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", " or ".join(tests)],
        env={**os.environ, "RESPSERVE_CPU_KERNEL_ISA": path},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout


def test_bf16_blocks_are_padded_and_ordered_for_the_kernel() -> None:
    weight = torch.arange(20 * 3, dtype=torch.float32).view(20, 3)
    blocks = pack_bf16_blocks(weight)
    assert blocks.shape == (2, 3, 16) and blocks.dtype == torch.bfloat16
    # k step 0 of block 0: columns 0-3, 8-11, 4-7, 12-15 (each column's first weight is 3 x its index)
    order = [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15]
    assert blocks[0, 0].tolist() == [3.0 * column for column in order]
    assert blocks[1, 2, :4].tolist() == [3.0 * 16 + 2, 3.0 * 17 + 2, 3.0 * 18 + 2, 3.0 * 19 + 2]
    assert not blocks[1, :, 4:].any()  # the padding


def test_amx_tiles_hold_pairs_of_k_side_by_side() -> None:
    torch.manual_seed(4)
    weight = torch.randn(20, 35).to(torch.bfloat16).float()
    tiles = pack_amx_tiles(weight)
    assert tiles.shape == (2, 32, 32) and tiles.dtype == torch.bfloat16  # K 35 -> 64: 32 pairs of k
    pairs = tiles.float().view(2, 32, 16, 2)  # [block, pair of k, column, k within the pair]
    expected = torch.zeros(2, 32, 16, 2)  # columns 20-31 and k 35-63 are padding
    for n in range(20):
        for k in range(35):
            expected[n // 16, k // 2, n % 16, k % 2] = weight[n, k]
    assert torch.equal(pairs, expected)


def test_only_weights_that_bf16_holds_exactly_are_kept_as_bf16() -> None:
    exact = bf16_exact_linear(64, 32)
    torch.manual_seed(2)
    inexact = torch.nn.Linear(64, 32)  # float32 random weights: most need more than bf16's 8 bits
    assert isinstance(prepared_linear(exact, bf16_kernel=True), Bf16Linear)
    assert isinstance(prepared_linear(inexact, bf16_kernel=True), PackedLinear)
    assert isinstance(prepared_linear(exact, bf16_kernel=False), PackedLinear)  # --no-cpu-kernels


@needs_kernels
@pytest.mark.parametrize("norm", ["llama", "qwen3", "gemma3"])
def test_a_fused_rms_norm_computes_what_transformers_norm_does(norm: str) -> None:
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    torch.manual_seed(3)
    module = {"llama": LlamaRMSNorm, "qwen3": Qwen3RMSNorm, "gemma3": Gemma3RMSNorm}[norm](64, eps=1e-5)
    with torch.no_grad():
        module.weight.copy_(torch.randn(64))
    parent = torch.nn.Module()
    parent.norm = module
    assert fuse_rms_norms(parent) == 1 and isinstance(parent.norm, FusedRMSNorm)
    assert parent.norm.offset == (1.0 if norm == "gemma3" else 0.0)  # Gemma scales by 1 + weight
    wide = torch.randn(2, 5, 3 * 64) * 4
    for x in (torch.randn(7, 64), torch.randn(1, 3, 64) * 100, wide[..., 64:128].unflatten(-1, (1, 64))):
        with torch.inference_mode():
            torch.testing.assert_close(parent.norm(x), module(x), rtol=1e-5, atol=1e-6)


def test_norms_the_kernel_does_not_compute_keep_their_own_forward() -> None:
    class ScaledRMSNorm(torch.nn.Module):  # an RMSNorm by name that computes something else
        def __init__(self) -> None:
            super().__init__()
            self.weight, self.eps = torch.nn.Parameter(torch.randn(8)), 1e-6

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    torch.manual_seed(4)
    parent = torch.nn.Module()
    parent.norm, parent.layer_norm = ScaledRMSNorm(), torch.nn.LayerNorm(8)
    assert fuse_rms_norms(parent) == 0
    assert isinstance(parent.norm, ScaledRMSNorm) and isinstance(parent.layer_norm, torch.nn.LayerNorm)


@needs_kernels
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (9, 3), (8, 1)])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("head_dim", [16, 24, 64, 128, 72, 20])  # 24, 72: AVX2 vectors on any CPU; 20: plain loop
def test_the_decode_kernel_attends_as_gathering_and_sdpa_do(
    heads: int, kv_heads: int, window: int | None, head_dim: int
) -> None:
    lengths = [1, 7, 16, 33, 4]
    (keys, values), tables, spans, block_size = decode_step(lengths, kv_heads, head_dim=head_dim)
    query = torch.randn(1, heads, len(lengths), head_dim)
    module = torch.nn.Module()
    results = []
    for attention in ("gather", "kernel"):
        layout = build_step_layout(tables, spans, block_size, torch.device("cpu"), decode_attention=attention)
        out, _ = paged_attention(module, query, keys, values, None, 0.3, sliding_window=window, paged_step=layout)
        results.append(out)
    assert not results[1].isnan().any()
    torch.testing.assert_close(results[1], results[0], atol=2e-6, rtol=1e-5)


def gathered_and_kernel(
    query: torch.Tensor,
    pool: list[torch.Tensor],
    tables: list[list[int]],
    spans: list[tuple[int, int]],
    block_size: int,
    scaling: float | None = None,
    window: int | None = None,
) -> list[torch.Tensor]:
    """One step's attention by gathering for SDPA, then by the kernels."""
    keys, values = pool
    cpu = torch.device("cpu")
    with torch.inference_mode():
        return [
            paged_attention(
                torch.nn.Module(),
                query,
                keys,
                values,
                None,
                scaling,
                sliding_window=window,
                paged_step=build_step_layout(tables, spans, block_size, cpu, decode_attention=attention),
            )[0]
            for attention in ("gather", "kernel")
        ]


@needs_kernels
def test_a_decode_row_mixed_with_a_prefill_chunk_goes_through_the_kernel() -> None:
    pool, tables, _, block_size = decode_step([9, 12], kv_heads=2)
    spans = [(8, 9), (0, 12)]  # a decode row, then a whole prompt's chunk
    outputs = gathered_and_kernel(torch.randn(1, 4, 13, 16), pool, tables, spans, block_size)
    torch.testing.assert_close(outputs[1], outputs[0], atol=2e-6, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("head_dim", [16, 24, 64, 20])  # 24: AVX2's vectors on any CPU; 20: SDPA's path
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize(("heads", "kv_heads"), [(9, 3), (4, 4)])
def test_the_chunk_kernel_attends_as_gathering_and_sdpa_do(
    head_dim: int, window: int | None, heads: int, kv_heads: int
) -> None:
    """Prompt chunks after a cached prefix, from position 0, and of one token beside them, in one step."""
    pool, tables, _, block_size = decode_step([30, 19, 40, 9], kv_heads, head_dim=head_dim)
    spans = [(11, 30), (0, 19), (39, 40), (0, 9)]
    query = torch.randn(1, heads, 19 + 19 + 1 + 9, head_dim)
    outputs = gathered_and_kernel(query, pool, tables, spans, block_size, 0.2, window)
    assert not outputs[1].isnan().any()
    torch.testing.assert_close(outputs[1], outputs[0], atol=2e-6, rtol=1e-5)


def chunk_attention_in_float64(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, first: int, scale: float, window: int
) -> torch.Tensor:
    """Causal attention of query [tokens, heads, D] at positions first.. over keys and values [n, kv_heads, D]."""
    group = query.shape[1] // keys.shape[1]
    k, v = (x.double().repeat_interleave(group, 1) for x in (keys, values))
    scores = torch.einsum("thd,nhd->htn", query.double(), k) * scale
    position = torch.arange(first, first + query.shape[0])[:, None]
    key = torch.arange(keys.shape[0])[None, :]
    seen = (key <= position) & ((key > position - window) if window else True)
    return torch.einsum("htn,nhd->thd", scores.masked_fill(~seen, float("-inf")).softmax(-1), v)


@needs_kernels
@pytest.mark.parametrize(
    ("head_dim", "heads", "kv_heads", "first", "tokens", "window"),
    [
        (64, 9, 3, 2096, 45, 0),  # the next turn of a long conversation, in SmolLM2's shapes (AMX: vectors)
        (64, 9, 3, 2096, 180, 0),  # the same with more new tokens (AMX: tiles, the last task in part)
        (64, 9, 3, 0, 600, 0),  # a prompt from its start, over many spans of keys
        (32, 4, 4, 7, 530, 6),
        (128, 8, 2, 600, 270, 0),
        (96, 6, 3, 1000, 260, 200),  # a sliding window that starts inside the chunk's context
        (64, 4, 1, 1500, 1, 0),
        (80, 2, 1, 100, 5, 0),  # 80: 16-wide vectors, not 32-wide tiles
    ],
)
def test_the_chunk_kernel_holds_float32_accuracy_over_long_contexts(
    head_dim: int, heads: int, kv_heads: int, first: int, tokens: int, window: int
) -> None:
    """Whichever path this CPU takes (AMX tiles for head sizes that are multiples of 32 and chunks of at
    least 512 rows per KV head), against float64, with the sequence's slots scattered over a pool whose
    other slots hold NaN."""
    torch.manual_seed(7)
    length = first + tokens
    pool = [torch.full((2 * length + 64, kv_heads, head_dim), float("nan")) for _ in range(2)]
    slots = torch.randperm(2 * length + 64)[:length]
    keys, values = torch.randn(length, kv_heads, head_dim), torch.randn(length, kv_heads, head_dim)
    pool[0][slots], pool[1][slots] = keys, values
    query = torch.randn(tokens, heads, head_dim)
    scale = head_dim**-0.5
    out = torch.ops.respserve.paged_chunk_attention(query, *pool, slots, first, scale, window)
    expected = chunk_attention_in_float64(query, keys, values, first, scale, window)
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize(
    ("head_dim", "heads", "kv_heads", "window"),
    [
        (64, 9, 3, 0),  # SmolLM2: three query heads weigh each value row together
        (64, 9, 3, 700),
        (128, 8, 1, 0),  # eight heads to a KV head: two passes of four with AVX-512
        (128, 28, 4, 0),  # seven: one pass of four, then three one at a time
        (80, 2, 1, 0),  # AVX-512's 16-wide vectors, AVX2's 8 wide
        (24, 4, 2, 0),  # AVX2's vectors on any CPU
        (20, 4, 2, 0),  # the plain loop
    ],
)
def test_the_decode_kernel_holds_float32_accuracy_over_long_contexts(
    head_dim: int, heads: int, kv_heads: int, window: int
) -> None:
    """Rows of lengths around whole vectors and far past the prefetch distance, against float64, with the
    slots scattered over a pool whose other slots hold NaN."""
    torch.manual_seed(11)
    lengths = [1, 15, 16, 17, 2100, 4099]
    total, width = sum(lengths), max(lengths)
    pool = [torch.full((2 * total + 64, kv_heads, head_dim), float("nan")) for _ in range(2)]
    scattered = torch.randperm(2 * total + 64)[:total]
    pool[0][scattered] = torch.randn(total, kv_heads, head_dim)
    pool[1][scattered] = torch.randn(total, kv_heads, head_dim)
    slots = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, mine in enumerate(scattered.split(lengths)):
        slots[row, : len(mine)] = mine
    query = torch.randn(len(lengths), heads, head_dim)
    scale = head_dim**-0.5
    out = torch.ops.respserve.paged_decode_attention(query, *pool, slots, torch.tensor(lengths), scale, window)
    for row, length in enumerate(lengths):
        first = max(0, length - window) if window else 0
        seen = slots[row, first:length]
        # The row's query is the last of its sequence: every key from `first` on is causal for it.
        expected = chunk_attention_in_float64(
            query[row : row + 1], pool[0][seen], pool[1][seen], len(seen) - 1, scale, 0
        )
        torch.testing.assert_close(out[row : row + 1].double(), expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("compiler", ["no-such-compiler", "false"])  # none on the PATH, or one that fails
def test_without_a_working_compiler_the_engine_runs_without_the_kernels(
    compiler: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CXX", compiler)
    kernel_dir = tmp_path / "kernels"
    with caplog.at_level(logging.WARNING):
        assert not uses_cpu_kernels(kernel_dir, torch.device("cpu"), torch.float32)
    assert "not available" in caplog.text
    assert not kernel_dir.exists() or not any(kernel_dir.iterdir())  # no library, nothing half-written


def test_the_kernels_serve_float32_on_the_cpu_only(tmp_path: Path) -> None:
    assert not uses_cpu_kernels(None, torch.device("cpu"), torch.float32)  # --no-cpu-kernels
    assert not uses_cpu_kernels(tmp_path, torch.device("cpu"), torch.bfloat16)
    assert not (tmp_path / "kernels").exists()


@needs_kernels
def test_the_embedded_model_is_served_with_the_kernels(server: RunningServer) -> None:
    worker = server.state.default_model.worker
    model = worker.pipeline.model
    layer = model.model.layers[0]
    # Its checkpoint (converted from the GGUF) is bf16, so every projection and the output head qualify.
    assert isinstance(model.lm_head, Bf16Linear)
    assert isinstance(layer.mlp.down_proj, Bf16Linear) and isinstance(layer.self_attn.o_proj, Bf16Linear)
    assert isinstance(layer.self_attn.q_proj.fused.linear, Bf16Linear)
    assert isinstance(layer.input_layernorm, FusedRMSNorm) and isinstance(model.model.norm, FusedRMSNorm)
    assert worker._runner.decode_attention == "kernel"


@needs_kernels
def test_no_cpu_kernels_serves_the_same_greedy_tokens_from_float32_weights(
    tmp_path: Path, server: RunningServer
) -> None:
    assert vars(_parser().parse_args(["serve", "--no-cpu-kernels"]))["cpu_kernels"] is False
    bodies = [
        {
            "input": f"Tell me one fact about the number {n}.",
            "temperature": 0,
            "max_output_tokens": 32,
            "logit_bias": never_ends(server),
            "include": ["message.output_text.logprobs"],
            "top_logprobs": 2,
        }
        for n in range(6)
    ]
    with_kernels = [httpx.post(f"{server.base_url}/v1/responses", json=body, timeout=120).json() for body in bodies]
    for plain in serving(load_settings(port=free_port(), data_dir=str(tmp_path), cpu_kernels=False)):
        worker = plain.state.default_model.worker
        assert isinstance(worker.pipeline.model.lm_head, PackedLinear) and worker._runner.decode_attention == "gather"
        for body, kept in zip(bodies, with_kernels, strict=True):
            without = httpx.post(f"{plain.base_url}/v1/responses", json=body, timeout=120).json()
            assert_same_greedy_tokens(kept, without)
