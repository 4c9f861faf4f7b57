"""The paged engine: KV blocks, prefix caching across requests, chunked prefill and preemption.

The model-level tests drive the real scheduler, block manager and model runner over tiny random models and
compare every sampled position's logits with a plain transformers forward over the whole sequence. The
server-level tests read only token counts (usage.input_tokens_details.cached_tokens)."""

from __future__ import annotations

import asyncio
import copy
import subprocess
import sys
from typing import Any

import httpx
import pytest
import torch
from conftest import (
    RunningServer,
    TextTokens,
    decode_greedily,
    free_port,
    needs_kernels,
    never_ends,
    start_server,
    stop_server,
    tiny_qwen3,
    unwritten,
)

from respserve.config import load_settings
from respserve.engine.block_manager import BlockManager
from respserve.engine.cpu_threads import SMALL_STEP_ROWS, CpuThreads, ThreadChoice
from respserve.engine.fused_norms import fuse_rms_norms
from respserve.engine.fused_projections import FusedSibling, fuse_projections
from respserve.engine.generation import GenerationRequest, SamplingParams
from respserve.engine.kv_cache import PagedKVCache, kv_budget_bytes
from respserve.engine.model_runner import ModelRunner
from respserve.engine.packed_linear import Bf16Linear, PackedLinear, can_pack, native_bf16, pack_linears
from respserve.engine.paged_attention import DecodeAttention
from respserve.engine.prefill_budget import SLOWDOWN, PrefillBudget
from respserve.engine.scheduler import Scheduler
from respserve.engine.sequence import Sequence


def _run_to_the_end(
    server: RunningServer,
    model: Any,
    prompts: list[list[int]],
    num_blocks: int,
    max_new: int,
    budget: int,
    device: str = "cpu",
    pack: bool = False,
    attention: DecodeAttention = "gather",
) -> Scheduler:
    """Greedy-decodes `prompts` through the paged engine on `device`, checking each sampled position's
    logits against a plain CPU forward of a copy of the model (its own attention, no cache) over the whole
    sequence. `attention`: how decode rows attend; "kernel" is with respserve's CPU kernels (bf16-kept
    weights where `pack` too)."""
    pipeline = server.state.default_model.worker.pipeline
    reference = type(model)(copy.deepcopy(model.config)).eval()
    reference.load_state_dict(model.state_dict())
    block_size = 4
    model.to(device)
    kernels = attention == "kernel"
    if pack:  # the CPU's load path: packed weights, sibling projections fused, norms fused with the kernels
        assert pack_linears(model, bf16_kernel=kernels) > 0
        if kernels:
            assert fuse_rms_norms(model) == 2 * 2 + 2 * 2 + 1  # per layer: 2 + q_norm and k_norm; the final one
    zeroed = attention == "flex"
    cache = PagedKVCache(model.config, num_blocks, block_size, torch.float32, torch.device(device), zeroed=zeroed)
    for pool in (*cache.keys, *cache.values):  # what a slot read before it is written would bring
        pool[block_size:].fill_(unwritten(attention))
    runner = ModelRunner(model, cache, torch.device(device), decode_attention=attention)
    scheduler = Scheduler(BlockManager(num_blocks, block_size), max_running=8, max_prefill_tokens=budget)
    scheduler.prefill_budget = PrefillBudget(budget, idle_tokens=budget)  # chunks of `budget`, decoding or not
    for index, prompt in enumerate(prompts):
        request = GenerationRequest(f"paged-{index}", prompt, SamplingParams(max_tokens=max_new, temperature=0))
        scheduler.add(
            Sequence(request, pipeline.tokenizer, pipeline.vocab_size, pipeline.grammars, pipeline.token_texts)
        )

    def check(sequence: Sequence, row: torch.Tensor) -> None:
        with torch.inference_mode():
            expected = reference(torch.tensor([sequence.token_ids])).logits[0, -1]
        torch.testing.assert_close(row.cpu(), expected, atol=2e-4, rtol=1e-4)

    decode_greedily(scheduler, runner, max_new, check)
    return scheduler


@pytest.mark.parametrize("attention", ["gather", pytest.param("kernel", marks=needs_kernels), "flex"])
@pytest.mark.parametrize("layers", [["full_attention"] * 2, ["sliding_attention", "full_attention"]])
def test_chunked_paged_steps_match_a_plain_forward(
    server: RunningServer, layers: list[str], attention: DecodeAttention
) -> None:
    tokenizer = server.state.default_model.worker.pipeline.tokenizer
    sliding = "sliding_attention" in layers
    model = tiny_qwen3(tokenizer, layer_types=layers, sliding_window=6, use_sliding_window=sliding)
    torch.manual_seed(1)
    prompts = [torch.randint(0, 1000, (length,)).tolist() for length in (5, 13, 1, 30)]
    _run_to_the_end(server, model, prompts, num_blocks=64, max_new=12, budget=7, attention=attention)


def test_packed_weights_and_fused_projections_match_a_plain_forward(server: RunningServer) -> None:
    model = tiny_qwen3(server.state.default_model.worker.pipeline.tokenizer)
    torch.manual_seed(3)
    prompts = [torch.randint(0, 1000, (length,)).tolist() for length in (6, 17, 1)]
    _run_to_the_end(server, model, prompts, num_blocks=64, max_new=8, budget=7, pack=True)
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.k_proj, FusedSibling) and isinstance(layer.mlp.up_proj, FusedSibling)


@needs_kernels
def test_bf16_kept_weights_match_a_plain_forward(server: RunningServer) -> None:
    model = tiny_qwen3(server.state.default_model.worker.pipeline.tokenizer)
    with torch.no_grad():  # a bf16 checkpoint served at float32
        for parameter in model.parameters():
            parameter.copy_(parameter.to(torch.bfloat16).float())
    torch.manual_seed(6)
    prompts = [torch.randint(0, 1000, (length,)).tolist() for length in (6, 17, 1, 40)]
    _run_to_the_end(server, model, prompts, num_blocks=64, max_new=8, budget=7, pack=True, attention="kernel")
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj.fused.linear, Bf16Linear) and isinstance(model.lm_head, Bf16Linear)


def test_a_sibling_called_on_another_input_computes_its_own_output() -> None:
    torch.manual_seed(4)
    parent = torch.nn.Module()
    parent.q_proj, parent.k_proj, parent.v_proj = (torch.nn.Linear(8, size) for size in (8, 4, 4))
    expected = {name: getattr(parent, name) for name in ("q_proj", "k_proj", "v_proj")}
    assert fuse_projections(parent, lambda linear: linear) == 1
    first, second = torch.randn(3, 8), torch.randn(5, 8)
    with torch.no_grad():  # cross-attention: q reads one input, k and v another; and a repeated call
        for name, x in (("q_proj", first), ("k_proj", second), ("v_proj", second), ("v_proj", second)):
            torch.testing.assert_close(getattr(parent, name)(x), expected[name](x))


@pytest.mark.skipif(not native_bf16(), reason="bfloat16 matmuls are emulated on this CPU, so not packed")
def test_bfloat16_weights_are_packed_where_the_cpu_computes_them() -> None:
    torch.manual_seed(5)
    linear = torch.nn.Linear(64, 96).to(torch.bfloat16)
    assert can_pack(torch.device("cpu"), torch.bfloat16)
    x = torch.randn(7, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        torch.testing.assert_close(PackedLinear(linear)(x), linear(x))


def test_a_full_pool_preempts_and_recomputes_without_changing_a_logit(server: RunningServer) -> None:
    model = tiny_qwen3(server.state.default_model.worker.pipeline.tokenizer)
    torch.manual_seed(2)
    prompts = [torch.randint(0, 1000, (length,)).tolist() for length in (9, 14, 3, 20)]
    # 19 usable blocks of 4 slots cannot hold the four sequences' 46 + 4 x 24 tokens at once.
    scheduler = _run_to_the_end(server, model, prompts, num_blocks=20, max_new=24, budget=16)
    assert scheduler.preemptions > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("attention", ["gather", "flex"])
def test_paged_cuda_steps_match_the_cpu_reference(server: RunningServer, attention: DecodeAttention) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 on both sides, so the logits compare closely
    model = tiny_qwen3(server.state.default_model.worker.pipeline.tokenizer)
    torch.manual_seed(3)
    prompts = [torch.randint(0, 1000, (length,)).tolist() for length in (7, 33, 2, 18)]
    _run_to_the_end(server, model, prompts, num_blocks=20, max_new=24, budget=16, device="cuda", attention=attention)


def test_the_prefill_budget_keeps_a_mixed_step_within_its_slowdown_of_a_decode_step() -> None:
    budget = PrefillBudget(max_tokens=512)
    assert budget.tokens(decoding=False) == 2048  # nobody to keep pace with
    assert budget.tokens(decoding=True) == 64  # costs not measured yet
    for _ in range(30):
        budget.observe(decode_rows=8, prefill_tokens=0, seconds=0.050)
        budget.observe(decode_rows=8, prefill_tokens=100, seconds=0.050 + 100 * 0.004)
    fits = budget.tokens(decoding=True)
    assert fits == int((SLOWDOWN - 1) * 0.050 / 0.004)
    assert 0.050 + fits * 0.004 <= SLOWDOWN * 0.050
    budget.observe(decode_rows=8, prefill_tokens=10, seconds=100.0)  # one very slow step: never below 16
    assert budget.tokens(decoding=True) == 16


def test_small_steps_try_both_thread_counts_then_keep_the_faster() -> None:
    choice = ThreadChoice((2, 1))
    seconds = {2: 0.010, 1: 0.006}  # one thread comes round faster here
    picks = []
    for _ in range(200):
        threads = choice.pick()
        picks.append(threads)
        choice.observe(threads, seconds[threads])
    assert picks[:16] == [2, 1] * 8  # alternating trials first
    assert choice.best == 1
    retries = [step for step, threads in enumerate(picks[16:], 17) if threads == 2]
    assert retries == [50, 100, 150, 200]  # then the faster, with a retry of the other every 50 steps
    seconds[2] = 0.001  # the load changed: two threads are now far faster, which the retries find
    for _ in range(500):
        threads = choice.pick()
        choice.observe(threads, seconds[threads])
    assert choice.best == 2


def test_thread_counts_are_set_per_step_and_idle_time_is_not_measured() -> None:
    cores = torch.get_num_threads()
    threads = CpuThreads(torch.device("cpu"))
    assert not CpuThreads(torch.device("cuda")).enabled
    if not threads.enabled:
        assert not 2 <= cores <= 4
        return
    try:
        seen = []
        for _ in range(4):
            threads.for_step(SMALL_STEP_ROWS)
            seen.append(torch.get_num_threads())
        assert seen == [cores, cores - 1, cores, cores - 1]
        threads.for_step(SMALL_STEP_ROWS + 1)  # a large step takes every core and measures nothing
        assert torch.get_num_threads() == cores
        measured = threads.choices[SMALL_STEP_ROWS.bit_length()]
        assert sum(measured.trials.values()) == 4
        threads.for_step(1)
        threads.idle()  # the worker waited for requests: that wait is nobody's step time
        threads.for_step(1)
        assert sum(threads.choices[1].trials.values()) == 0
        threads.for_step(1)  # the second trial: one core fewer
        assert torch.get_num_threads() == cores - 1
        threads.restore()  # a stopping worker leaves the process's count as it found it
        assert torch.get_num_threads() == cores
    finally:
        torch.set_num_threads(cores)


def test_block_manager_shares_published_prefixes_and_evicts_the_least_recently_released() -> None:
    blocks = BlockManager(num_blocks=9, block_size=4)  # block 0 is the zero block: 8 to hand out
    first = TextTokens(list(range(10)))
    assert blocks.allocate(first) and first.num_computed == 0 and len(first.block_table) == 3
    first.num_computed = 10
    blocks.publish(first)  # two full blocks: tokens 0-3 and 4-7
    assert len(first.block_hashes) == 2

    same_start = TextTokens([*range(8), 99, 98, 97])
    assert blocks.allocate(same_start) and same_start.num_computed == 8
    assert same_start.block_table[:2] == first.block_table[:2]
    # Never the whole prompt: its last token is computed for its logits.
    exactly = TextTokens(list(range(8)))
    assert blocks.allocate(exactly) and exactly.num_computed == 4
    for sequence in (first, same_start, exactly):
        blocks.free(sequence)
    assert blocks.num_used == 0 and blocks.num_available == 8

    # Released blocks stay cached until their slots are needed; the tail of a prefix goes first.
    filler = TextTokens(list(range(100, 128)))  # seven blocks: the six free ones, then one evicted
    assert blocks.allocate(filler)
    blocks.free(filler)
    again = TextTokens(list(range(12)))
    assert blocks.allocate(again) and again.num_computed == 4  # block 4-7 was evicted, 0-3 survived
    assert not blocks.allocate(TextTokens(list(range(200, 240))))  # more than the pool holds: nothing taken
    assert blocks.num_used == 3


def test_freed_blocks_are_reused_before_blocks_never_used() -> None:
    """The pool is allocated untouched: a block never used costs no memory until it is first written, so
    blocks freed unpublished (a partial last block, a block already cached under another id) come back
    first, and a server's resident memory stops growing once its load and cache fit (it used to creep up
    by the KV of every request, until the whole pool was resident)."""
    blocks = BlockManager(num_blocks=64, block_size=4)
    touched: set[int] = set()
    for n in range(20):
        # The same prompt each time (its full blocks cached), then an answer of its own: published, and a
        # partial block freed unpublished.
        request = TextTokens([*range(8), *range(1000 + 10 * n, 1000 + 10 * n + 6)])
        assert blocks.allocate(request)
        touched.update(request.block_table)
        request.num_computed = len(request.token_ids)
        blocks.publish(request)
        blocks.free(request)
    repeated = TextTokens([*range(8), 5000, 5001, 5002])  # unpublished: the same block over and over
    for _ in range(10):
        assert blocks.allocate(repeated)
        touched.update(repeated.block_table)
        blocks.free(repeated)
    # Two cached prompt blocks, then per request one published answer block and one partial block, which
    # the next request reuses; the repeated request takes the partial block of the last one.
    assert len(touched) == 2 + 20 + 1


def test_kv_bytes_per_token_are_exactly_the_models_keys_and_values(server: RunningServer) -> None:
    worker = server.state.default_model.worker
    config = worker.pipeline.model.config
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4
    cache = worker.kv_cache
    assert cache.num_bytes == cache.num_blocks * cache.block_size * per_token
    assert kv_budget_bytes("3MiB", torch.device("cpu")) == 3 * 2**20
    assert kv_budget_bytes("2.5GB", torch.device("cpu")) == 2_500_000_000
    assert 0 < kv_budget_bytes("0.5", torch.device("cpu")) < kv_budget_bytes("1", torch.device("cpu"))


INSTRUCTIONS = "You are a careful assistant. " + "Follow every rule of the house style guide. " * 40


def test_a_previous_response_id_chain_reuses_the_history_kv(http: httpx.Client, server: RunningServer) -> None:
    block = server.state.default_model.worker.kv_cache.block_size
    body = {"instructions": INSTRUCTIONS, "max_output_tokens": 16, "logit_bias": never_ends(server)}
    first = http.post("/v1/responses", json={**body, "input": "Turn one of a long chat."}).json()
    second = http.post("/v1/responses", json={**body, "input": "Turn two.", "previous_response_id": first["id"]}).json()
    history = first["usage"]["input_tokens"]
    # Every full block of the first prompt is reused (its output too, up to how the template re-renders it).
    assert second["usage"]["input_tokens_details"]["cached_tokens"] >= history // block * block


def test_a_stateless_client_resending_the_same_instructions_hits_the_cache(
    http: httpx.Client, server: RunningServer
) -> None:
    block = server.state.default_model.worker.kv_cache.block_size
    instructions = INSTRUCTIONS.replace("careful", "stateless")
    bodies = [
        {"instructions": instructions, "input": question, "max_output_tokens": 16, "prompt_cache_key": "agent"}
        for question in ("What is two plus two?", "Name a colour.")
    ]
    first, second = (http.post("/v1/responses", json=body).json() for body in bodies)
    shared = len(server.state.default_model.worker.pipeline.tokenizer(instructions)["input_ids"])
    assert first["usage"]["input_tokens_details"]["cached_tokens"] < shared - block
    assert second["usage"]["input_tokens_details"]["cached_tokens"] >= (shared // block - 1) * block


def test_requests_wait_for_kv_blocks_rather_than_fail(tmp_path) -> None:  # noqa: ANN001
    # A pool of 160 token slots: a prompt of ~40 tokens with 64 output tokens needs ~7 of its 10 blocks.
    settings = load_settings(
        port=free_port(), data_dir=str(tmp_path), kv_cache_memory=str(160 * 30 * 3 * 64 * 2 * 4), max_queued=8
    )
    uv_server, thread, small = start_server(settings)
    try:
        worker = small.state.default_model.worker
        assert worker.kv_cache.num_blocks == 10
        body = {"max_output_tokens": 64, "logit_bias": never_ends(small), "temperature": 0}

        async def run_all() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=small.base_url, timeout=300) as client:
                posts = [client.post("/v1/responses", json={**body, "input": f"Count to {n}."}) for n in range(3)]
                return await asyncio.gather(*posts)

        results = asyncio.run(run_all())
        assert [result.status_code for result in results] == [200, 200, 200]
        assert [result.json()["usage"]["output_tokens"] for result in results] == [64, 64, 64]
        with httpx.Client(base_url=small.base_url, timeout=60) as client:
            too_long = client.post("/v1/responses", json={"input": "word " * 200})
        assert too_long.status_code == 400
        assert too_long.json()["error"]["code"] == "context_length_exceeded"
    finally:
        stop_server(uv_server, thread)


_TEAM_PROBE = """
import os, time
import torch
from respserve.engine.cpu_threads import on_passing_thread

def threads():
    return len(os.listdir("/proc/self/task"))

def parallel_op():
    return float(torch.randn(1 << 22).exp_().sum())  # large enough to run on every torch thread

torch.set_num_threads(2)
before = threads()
assert on_passing_thread(parallel_op) > 0
deadline = time.monotonic() + 2  # an ending OpenMP team's threads exit just after their thread does
while threads() != before and time.monotonic() < deadline:
    time.sleep(0.01)
after_passing = threads()
try:
    on_passing_thread(lambda: 1 / 0)
    raised = False
except ZeroDivisionError:  # its error reaches the caller
    raised = True
parallel_op()  # on this thread, which stays
print(before, after_passing, threads(), raised)
"""


def test_a_passing_thread_takes_its_openmp_team_with_it() -> None:
    """What the server's model loading relies on (cpu_threads.on_passing_thread), in a fresh process: the
    team of threads OpenMP makes for a thread that runs a parallel op lives as long as that thread."""
    probe = subprocess.run([sys.executable, "-c", _TEAM_PROBE], capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    before, after_passing, after_staying, raised = probe.stdout.split()
    assert int(after_passing) == int(before)  # the passing thread and its team are gone
    assert int(after_staying) > int(before)  # the staying main thread keeps a team
    assert raised == "True"
