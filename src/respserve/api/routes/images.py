"""`GET /v1/images/{image_id}/content`: the bytes behind an `output_image` part's `image_url`."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from respserve.api.auth import Owner
from respserve.api.errors import NotFoundError
from respserve.api.state import StateDep

router = APIRouter()


@router.get("/v1/images/{image_id}/content")
async def image_content(image_id: str, state: StateDep, owner: Owner) -> Response:
    image = await state.store.get_image(image_id, owner)
    if image is None:
        raise NotFoundError(f"Image with id '{image_id}' not found.", param="image_id")
    # Generated once and never changed: clients and proxies may keep it.
    return Response(image.data, media_type=image.media_type, headers={"Cache-Control": "private, max-age=86400"})
