"""What the routes share: the settings and the served models (text and image), set up by the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from respserve.api.background import BackgroundJobs
from respserve.api.encrypted_reasoning import ReasoningSealer
from respserve.api.errors import NotFoundError
from respserve.api.leases import LeaseKeeper
from respserve.api.metrics import Metrics
from respserve.config import Settings
from respserve.engine.image_worker import ImageWorker
from respserve.engine.worker import PipelineWorker
from respserve.store.base import ResponseStore


@dataclass
class ServedModel:
    name: str
    created: int
    worker: PipelineWorker


@dataclass
class ServedImageModel:
    name: str
    created: int
    worker: ImageWorker


@dataclass
class AppState:
    settings: Settings
    store: ResponseStore
    background: BackgroundJobs
    metrics: Metrics
    reasoning_sealer: ReasoningSealer
    leases: LeaseKeeper
    models: dict[str, ServedModel | ServedImageModel] = field(default_factory=dict)

    @property
    def default_model(self) -> ServedModel | ServedImageModel:
        """The text model (loaded first), else the first image model."""
        return next(iter(self.models.values()))

    @property
    def image_models(self) -> list[ServedImageModel]:
        return [served for served in self.models.values() if isinstance(served, ServedImageModel)]

    def resolve_model(self, name: str | None) -> ServedModel | ServedImageModel:
        if not name:
            return self.default_model
        served = self.models.get(name)
        if served is None:
            raise NotFoundError(
                f"The model '{name}' does not exist. Served models: {', '.join(self.models)}.",
                param="model",
                code="model_not_found",
            )
        return served


def get_state(request: Request) -> AppState:
    return request.app.state.respserve


StateDep = Annotated[AppState, Depends(get_state)]
