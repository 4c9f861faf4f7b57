"""`respserve serve`: parse flags into Settings and run the server with uvicorn."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="respserve", description="An OpenAI Responses API server.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a model (the embedded SmolLM2 by default)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--model", help="smollm2 (default), a transformers folder, a .gguf file or a hub id")
    serve.add_argument("--served-model-name", dest="served_model_name")
    serve.add_argument("--device", choices=["auto", "cpu", "cuda"])
    serve.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"])
    serve.add_argument("--cache-dir", dest="cache_dir")
    serve.add_argument("--data-dir", dest="data_dir", help="where stored responses and conversations live")
    serve.add_argument("--lease-seconds", dest="lease_s", type=float, help="replica lease on running responses")
    serve.add_argument("--store", help="postgresql://user@host/db to share state between replicas (default: SQLite)")
    serve.add_argument("--max-output-tokens", dest="max_output_tokens", type=int)
    serve.add_argument("--tool-parser", dest="tool_parser", choices=["hermes", "json"])
    serve.add_argument("--reasoning-parser", dest="reasoning_parser", choices=["auto", "think", "none"])
    serve.add_argument("--max-body-bytes", dest="max_body_bytes", type=int)
    serve.add_argument("--max-file-bytes", dest="max_file_bytes", type=int, help="largest uploaded or inline file")
    serve.add_argument("--max-file-pages", dest="max_file_pages", type=int, help="most pages of a PDF input_file")
    serve.add_argument("--max-file-chars", dest="max_file_chars", type=int, help="longest text of an input_file")
    serve.add_argument("--max-image-pixels", dest="max_image_pixels", type=int, help="largest input image (w x h)")
    serve.add_argument(
        "--allow-image-urls", dest="allow_image_urls", action="store_const", const=True, help="fetch https image URLs"
    )
    serve.add_argument(
        "--allow-private-image-urls",
        dest="image_url_allow_private",
        action="store_const",
        const=True,
        help="fetch image URLs from private/loopback addresses too",
    )
    serve.add_argument("--image-url-timeout", dest="image_url_timeout_s", type=float)
    serve.add_argument("--request-timeout", dest="request_timeout_s", type=float)
    serve.add_argument("--shutdown-grace", dest="shutdown_grace_s", type=float)
    serve.add_argument("--max-running", dest="max_running", type=int)
    serve.add_argument("--max-queued", dest="max_queued", type=int)
    serve.add_argument("--max-prefill-tokens", dest="max_prefill_tokens", type=int)
    serve.add_argument("--tensor-parallel-size", dest="tensor_parallel_size", type=int, help="shard the model")
    serve.add_argument("--kv-cache-memory", dest="kv_cache_memory", help="KV pool: 4GiB, 500MB, 0.8 (of free), auto")
    serve.add_argument(
        "--cuda-graphs",
        dest="cuda_graphs",
        action=argparse.BooleanOptionalAction,
        help="replay CUDA decode steps as captured graphs (default: on)",
    )
    serve.add_argument(
        "--decode-attention",
        dest="decode_attention",
        choices=["auto", "flex", "gather"],
        help="how decode rows read the KV pool: auto (our CPU kernel, flex attention on CUDA), flex, gather",
    )
    serve.add_argument(
        "--cpu-kernels",
        dest="cpu_kernels",
        action=argparse.BooleanOptionalAction,
        help="on the CPU in float32, respserve's kernels: bf16-kept weights, decode attention, RMSNorm (default: on)",
    )
    serve.add_argument(
        "--image-model", dest="image_models", action="append", help="a diffusers folder, PATH or ID=PATH (repeatable)"
    )
    serve.add_argument(
        "--image-compile", dest="image_compile", action="store_const", const=True, help="torch.compile image models"
    )
    serve.add_argument("--image-max-batch", dest="image_max_batch", type=int)
    serve.add_argument("--image-max-side", dest="image_max_side", type=int)
    serve.add_argument("--log-level", dest="log_level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--api-key", dest="api_keys", action="append", help="accepted key (repeatable)")
    serve.add_argument(
        "--protect-metrics", dest="protect_metrics", action="store_const", const=True, help="/metrics needs a key"
    )
    serve.add_argument("--secret-key", dest="secret_key", help="seals reasoning.encrypted_content")
    serve.add_argument("--log-json", dest="log_json", action="store_const", const=True, help="JSON log lines")
    serve.add_argument("--config", help="a TOML settings file (see configs/default.toml)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = vars(_parser().parse_args(argv))
    command = args.pop("command")
    if command == "serve":
        import uvicorn

        from respserve.api.app import create_app
        from respserve.config import load_settings

        settings = load_settings(**args)
        logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        uvicorn.run(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            timeout_graceful_shutdown=settings.shutdown_grace_s,
        )


if __name__ == "__main__":
    main()
