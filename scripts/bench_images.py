"""Image generation benchmark: respserve against plain diffusers, and what images cost text streams.

1. Peer: each pipeline called directly with diffusers, one image per call, one call after another.
2. respserve: the same pipelines behind `respserve serve --image-model`, driven by N concurrent clients
   (N in --concurrency) sending the same requests; compatible requests are batched into one call.
   Prints images/s and per-step time for both and the respserve/diffusers ratio.
3. Interference: one greedy text stream alone, then while image requests run back to back on the first
   pipeline; prints the text stream's inter-token gaps beside the time of one denoising step.

    python scripts/bench_images.py                 # tiny SD, Flux and SD3 pipelines on the CPU
    python scripts/bench_images.py --large         # an SD-1.5-shaped pipeline (random weights), for a GPU
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_peers import ServerProcess  # noqa: E402
from bench_streams import percentile, stream_one  # noqa: E402
from random_pipelines import build  # noqa: E402

PROMPT = "a lighthouse on a cliff at dusk, oil painting"


@dataclass
class ImageRun:
    model: str
    runner: str  # "diffusers" or "respserve"
    concurrency: int
    images: int
    wall_s: float
    steps: int

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s

    @property
    def step_ms(self) -> float:
        """Wall time per denoising step of one image (batched steps count once per image)."""
        return self.wall_s / self.images / self.steps * 1000


def run_diffusers(folder: Path, model: str, size: int, steps: int, images: int, device: str) -> ImageRun:
    import torch
    from diffusers import AutoPipelineForText2Image

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    pipe = AutoPipelineForText2Image.from_pretrained(folder, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)

    def one(seed: int) -> None:
        generator = torch.Generator("cpu").manual_seed(seed)
        with torch.inference_mode():
            pipe(PROMPT, width=size, height=size, num_inference_steps=steps, generator=generator)

    one(0)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for seed in range(images):
        one(seed)
    if device == "cuda":
        torch.cuda.synchronize()
    return ImageRun(model, "diffusers", 1, images, time.perf_counter() - started, steps)


async def run_respserve(base_url: str, model: str, size: int, steps: int, images: int, concurrency: int) -> ImageRun:
    options = {"width": size, "height": size, "steps": steps}
    async with httpx.AsyncClient(base_url=base_url, timeout=1800) as client:

        async def one(seed: int) -> None:
            body = {"model": model, "input": PROMPT, "seed": seed, "provider_options": {"image": options}}
            response = await client.post("/v1/responses", json=body)
            response.raise_for_status()

        await one(0)  # warm-up
        queue = list(range(images))

        async def worker() -> None:
            while queue:
                await one(queue.pop())

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return ImageRun(model, "respserve", concurrency, images, time.perf_counter() - started, steps)


async def interference(base_url: str, text_model: str, image_model: str, size: int, steps: int) -> dict[str, float]:
    """Text inter-token gaps alone and beside back-to-back image requests."""
    async with httpx.AsyncClient(base_url=base_url, timeout=1800) as client:
        alone = await stream_one(client, text_model, "Count from one to one thousand.", 128)
        stop = asyncio.Event()
        image_seconds: list[float] = []

        async def images() -> None:
            options = {"width": size, "height": size, "steps": steps}
            while not stop.is_set():
                started = time.perf_counter()
                body = {"model": image_model, "input": PROMPT, "provider_options": {"image": options}}
                (await client.post("/v1/responses", json=body)).raise_for_status()
                image_seconds.append(time.perf_counter() - started)

        load = asyncio.create_task(images())
        await asyncio.sleep(0.5)
        beside = await stream_one(client, text_model, "Count from one to one thousand.", 128)
        stop.set()
        await load
    step_ms = percentile(image_seconds, 50) / steps * 1000
    return {
        "text_tok_s_alone": alone.output_tokens / alone.latency,
        "text_tok_s_beside_images": beside.output_tokens / beside.latency,
        "itl_p50_ms_alone": percentile(alone.inter_token, 50) * 1000,
        "itl_p99_ms_alone": percentile(alone.inter_token, 99) * 1000,
        "itl_p50_ms_beside_images": percentile(beside.inter_token, 50) * 1000,
        "itl_p99_ms_beside_images": percentile(beside.inter_token, 99) * 1000,
        "itl_max_ms_beside_images": max(beside.inter_token) * 1000,
        "image_step_ms": step_ms,
        "image_size": size,
        "image_steps": steps,
    }


def print_table(runs: list[ImageRun]) -> None:
    peers = {run.model: run for run in runs if run.runner == "diffusers"}
    print(f"{'model':<10} {'runner':<10} {'clients':>7} {'images':>6} {'images/s':>9} {'ms/step/img':>11} {'ratio':>6}")
    for run in runs:
        peer = peers.get(run.model)
        ratio = run.images_per_s / peer.images_per_s if peer else float("nan")
        print(
            f"{run.model:<10} {run.runner:<10} {run.concurrency:>7} {run.images:>6} {run.images_per_s:>9.2f}"
            f" {run.step_ms:>11.1f} {ratio:>6.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny-sd", "tiny-flux", "tiny-sd3"])
    parser.add_argument("--large", action="store_true", help="benchmark the SD-1.5-shaped pipeline instead")
    parser.add_argument("--size", type=int, default=None, help="image side (default 128; 512 with --large)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--images", type=int, default=16, help="images per run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--text-model", help="respserve's text model (default: the embedded SmolLM2)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "respserve-bench-images")
    parser.add_argument("--out", type=Path, default=Path("bench-results") / "images.json")
    parser.add_argument("--port", type=int, default=8124)
    args = parser.parse_args()
    models = ["sd-large"] if args.large else args.models
    size = args.size or (512 if args.large else 128)
    folders = {model: build(model, args.workdir / model) for model in models}

    runs = [run_diffusers(folders[model], model, size, args.steps, args.images, args.device) for model in models]
    command = [sys.executable, "-m", "respserve", "serve", "--port", str(args.port), "--device", args.device]
    command += ["--data-dir", str(args.workdir / "data")]
    if args.text_model:
        command += ["--model", args.text_model]
    for model in models:
        command += ["--image-model", f"{model}={folders[model]}"]
    base_url = f"http://127.0.0.1:{args.port}"
    with ServerProcess(command, args.port, args.workdir / "respserve.log"):
        for model in models:
            for concurrency in args.concurrency:
                runs.append(asyncio.run(run_respserve(base_url, model, size, args.steps, args.images, concurrency)))
        text_model = httpx.get(f"{base_url}/v1/models").json()["data"][0]["id"]
        mixed = asyncio.run(interference(base_url, text_model, models[0], size, max(args.steps, 20)))
    print_table(runs)
    print(json.dumps(mixed, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"runs": [{**asdict(run), "images_per_s": run.images_per_s} for run in runs], "interference": mixed}
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
