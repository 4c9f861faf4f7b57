"""`GET /v1/models` and `GET /v1/models/{id}`."""

from __future__ import annotations

from fastapi import APIRouter

from respserve.api.auth import Owner
from respserve.api.state import ServedImageModel, ServedModel, StateDep
from respserve.protocol.models import ModelCard, ModelList

router = APIRouter()


def _card(served: ServedModel | ServedImageModel) -> ModelCard:
    return ModelCard(id=served.name, created=served.created)


@router.get("/v1/models")
async def list_models(state: StateDep, _: Owner) -> ModelList:
    return ModelList(data=[_card(served) for served in state.models.values()])


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, state: StateDep, _: Owner) -> ModelCard:
    return _card(state.resolve_model(model_id))
