"""The image worker's outputs become a Response: an image model's assistant message of `output_image` parts,
or, for a text model forced to call OpenAI's `image_generation` tool, an `image_generation_call` item.

Streams carry previews as they come: `response.output_image.partial_image` for a message (our event, see
protocol/events.py), OpenAI's `response.image_generation_call.partial_image` for the tool call.
"""

from __future__ import annotations

import base64

from respserve.api.response_events import FINAL_STATUS, ResponseEvents
from respserve.engine.generation import EncodedImage, GenerationOutput, GenerationStatus
from respserve.protocol.content import OutputImage
from respserve.protocol.events import (
    ContentPartAddedEvent,
    ContentPartDoneEvent,
    ImageGenerationCallCompletedEvent,
    ImageGenerationCallGeneratingEvent,
    ImageGenerationCallInProgressEvent,
    ImageGenerationCallPartialImageEvent,
    OutputImagePartialEvent,
    OutputItemAddedEvent,
    OutputItemDoneEvent,
    StreamEvent,
)
from respserve.protocol.ids import new_id
from respserve.protocol.items import ImageGenerationCall, OutputMessage
from respserve.protocol.response import ResponseResource


def _b64(image: EncodedImage) -> str:
    return base64.b64encode(image.data).decode("ascii")


class ImageMessageConverter(ResponseEvents):
    """One assistant message whose content is the images, inline (`image_data`) or by URL (`image_url`)."""

    def __init__(self, resource: ResponseResource, image_urls: list[str] | None = None) -> None:
        super().__init__(resource)
        self._image_urls = image_urls  # None: inline base64
        self._message = OutputMessage(id=new_id("msg"), status="in_progress", content=[])

    def start(self) -> list[StreamEvent]:
        added = OutputItemAddedEvent(output_index=0, item=self._message.model_copy(deep=True))
        return [*super().start(), self._event(added)]

    def on_output(self, output: GenerationOutput) -> list[StreamEvent]:
        message = self._message
        events = [
            self._event(
                OutputImagePartialEvent(
                    item_id=message.id,
                    output_index=0,
                    content_index=preview.index,
                    partial_image_index=output.preview_index,
                    partial_image_b64=_b64(preview),
                    output_format=preview.format,
                )
            )
            for preview in output.previews
        ]
        if not output.final_status.is_done:
            return events
        for image in output.images:
            part = self._part(image)
            message.content.append(part)
            for event_type in (ContentPartAddedEvent, ContentPartDoneEvent):
                events.append(
                    self._event(event_type(item_id=message.id, output_index=0, content_index=image.index, part=part))
                )
        completed = output.final_status is GenerationStatus.END_OF_SEQUENCE
        message.status = "completed" if completed else "incomplete"
        self.resource.output = [message]
        events.append(self._event(OutputItemDoneEvent(output_index=0, item=message.model_copy(deep=True))))
        return events + self._end(FINAL_STATUS[output.final_status], output.error)

    def _part(self, image: EncodedImage) -> OutputImage:
        if self._image_urls is not None:
            return OutputImage(image_url=self._image_urls[image.index], format=image.format)
        return OutputImage(image_data=_b64(image), format=image.format)


class ImageCallConverter(ResponseEvents):
    """One `image_generation_call` item, as OpenAI's hosted tool returns it (one image, base64 `result`)."""

    def __init__(self, resource: ResponseResource, revised_prompt: str, size: str) -> None:
        super().__init__(resource)
        self._call = ImageGenerationCall(
            id=new_id("ig"), status="in_progress", revised_prompt=revised_prompt, size=size
        )

    def start(self) -> list[StreamEvent]:
        call = self._call
        return [
            *super().start(),
            self._event(OutputItemAddedEvent(output_index=0, item=call.model_copy())),
            self._event(ImageGenerationCallInProgressEvent(item_id=call.id, output_index=0)),
            self._event(ImageGenerationCallGeneratingEvent(item_id=call.id, output_index=0)),
        ]

    def on_output(self, output: GenerationOutput) -> list[StreamEvent]:
        call = self._call
        events = [
            self._event(
                ImageGenerationCallPartialImageEvent(
                    item_id=call.id,
                    output_index=0,
                    partial_image_index=output.preview_index,
                    partial_image_b64=_b64(preview),
                )
            )
            for preview in output.previews[:1]
        ]
        if not output.final_status.is_done:
            return events
        if output.images:
            call.result = _b64(output.images[0])
            call.output_format = output.images[0].format
        call.status = "completed" if output.final_status is GenerationStatus.END_OF_SEQUENCE else "failed"
        self.resource.output = [call]
        if call.status == "completed":
            events.append(self._event(ImageGenerationCallCompletedEvent(item_id=call.id, output_index=0)))
        events.append(self._event(OutputItemDoneEvent(output_index=0, item=call.model_copy())))
        return events + self._end(FINAL_STATUS[output.final_status], output.error)
