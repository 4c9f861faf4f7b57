"""The FastAPI application: its lifespan loads the models and starts their workers, then stops them."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from sse_starlette.sse import AppStatus

from respserve import __version__
from respserve.api.background import BackgroundJobs
from respserve.api.body_limit import BodyLimitMiddleware
from respserve.api.encrypted_reasoning import ReasoningSealer
from respserve.api.errors import install_error_handlers
from respserve.api.leases import LeaseKeeper
from respserve.api.metrics import Metrics
from respserve.api.request_log import RequestLogMiddleware
from respserve.api.routes import conversations, files, health, images, models, responses
from respserve.api.routes import metrics as metrics_routes
from respserve.api.state import AppState, ServedImageModel, ServedModel
from respserve.config import Settings
from respserve.engine.cpu_threads import on_passing_thread
from respserve.engine.device import pick_device
from respserve.engine.image_pipeline import ImagePipeline
from respserve.engine.image_worker import ImageWorker, ImageWorkerLimits
from respserve.engine.model_source import resolve_model_source
from respserve.engine.tensor_parallel import TensorParallelGroup, rank_device
from respserve.engine.text_pipeline import TextPipeline
from respserve.engine.vision_pipeline import VisionLanguagePipeline, is_vision_model
from respserve.engine.worker import PipelineWorker, WorkerLimits
from respserve.store import open_store

logger = logging.getLogger(__name__)
UPLOAD_FRAMING_BYTES = 64 * 1024


def load_text_model(settings: Settings) -> ServedModel:
    source = resolve_model_source(settings.model, settings.cache_dir)
    peers, device = None, settings.device
    if settings.tensor_parallel_size > 1:  # the peers load their shards while this process loads its own
        rank0 = rank_device(pick_device(settings.device), 0)
        peers = TensorParallelGroup(settings.tensor_parallel_size, source.path, rank0, settings.dtype)
        device = str(rank0)
    kind = VisionLanguagePipeline if is_vision_model(source) else TextPipeline
    kernels = settings.cache_dir / "kernels" if settings.cpu_kernels else None
    shards = settings.tensor_parallel_size
    pipeline = kind.load(source, device=device, dtype=settings.dtype, tensor_parallel=shards, kernel_dir=kernels)
    limits = WorkerLimits(
        max_running=settings.max_running,
        max_queued=settings.max_queued,
        max_prefill_tokens=settings.max_prefill_tokens,
        kv_cache_memory=settings.kv_cache_memory,
        cuda_graphs=settings.cuda_graphs,
        decode_attention=settings.decode_attention,
        spare_a_core=not settings.image_model_specs,
    )
    worker = PipelineWorker(pipeline, limits, peers)
    worker.start()
    return ServedModel(name=settings.served_model_name or source.name, created=int(time.time()), worker=worker)


def load_image_models(settings: Settings) -> list[ServedImageModel]:
    served = []
    for spec in settings.image_model_specs:
        pipeline = ImagePipeline.load(
            Path(spec.path), device=settings.device, dtype=settings.dtype, compile=settings.image_compile
        )
        worker = ImageWorker(
            pipeline, ImageWorkerLimits(max_batch_images=settings.image_max_batch, max_queued=settings.max_queued)
        )
        worker.start()
        served.append(ServedImageModel(name=spec.id, created=int(time.time()), worker=worker))
    return served


def create_app(settings: Settings) -> FastAPI:
    store = open_store(settings.data_dir, settings.store)
    metrics = Metrics()
    sealer = ReasoningSealer.from_settings(settings.secret_key, settings.data_dir)
    state = AppState(
        settings=settings,
        store=store,
        background=BackgroundJobs(store),
        metrics=metrics,
        reasoning_sealer=sealer,
        leases=LeaseKeeper(store, settings.lease_s),
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await store.open()  # here, not in create_app: its connections belong to the serving event loop
        if store.shared:  # replicas: leases tell a dead replica's responses from a live one's
            state.leases.start()
        else:  # a store of this process alone: what it left unfinished died with it
            interrupted = await store.fail_unfinished("The server restarted before this response finished.")
            if interrupted:
                logger.warning("marked %d responses interrupted by a restart as failed", interrupted)
        await state.background.connect()
        # On a thread that ends, so that the worker's OpenMP team is the process's only one (cpu_threads.py).
        served, image_models = on_passing_thread(lambda: (load_text_model(settings), load_image_models(settings)))
        state.models[served.name] = served
        metrics.watch(served.worker)
        for image_model in image_models:
            state.models[image_model.name] = image_model
            metrics.watch_images(image_model.name, image_model.worker)
        logger.info("serving %s; store in %s", ", ".join(state.models), settings.data_dir)
        # What is loaded now (modules, tokenizer tables, transformers' registries) lives as long as the server.
        # Frozen, the collector's full passes skip it; left in, one pass over it held the event loop and the
        # worker for 238 ms (measured on the 2-core CPU, in the middle of a burst of 8 requests).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()  # a process that serves again (tests) may collect what this server leaves
            await state.background.shutdown()
            await state.leases.stop()
            for model in state.models.values():
                model.worker.stop()
            await store.close()

    # sse-starlette ends every open stream the moment SIGTERM arrives; a graceful shutdown lets them finish,
    # and uvicorn's `timeout_graceful_shutdown` (--shutdown-grace) bounds how long that may take.
    AppStatus.disable_automatic_graceful_drain()
    app = FastAPI(title="respserve", version=__version__, lifespan=lifespan)
    app.state.respserve = state
    install_error_handlers(app)
    # An upload's body is its file plus the multipart framing; the route itself refuses a file over the cap.
    upload_limit = (settings.max_file_bytes + UPLOAD_FRAMING_BYTES, "file")
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, path_limits={"/v1/files": upload_limit})
    app.add_middleware(RequestLogMiddleware, metrics=metrics, json_logs=settings.log_json)
    app.include_router(health.router)
    app.include_router(metrics_routes.router)
    app.include_router(models.router)
    app.include_router(responses.router)
    app.include_router(conversations.router)
    app.include_router(images.router)
    app.include_router(files.router)
    return app
