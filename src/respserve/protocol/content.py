"""Content parts of message items, input and output side, discriminated on `type`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class WireModel(BaseModel):
    """Base of every request-side model: unknown keys are ignored, as the OpenAI API tolerates SDK extras."""

    model_config = ConfigDict(extra="ignore")


class InputText(WireModel):
    type: Literal["input_text"] = "input_text"
    text: str


class InputImage(WireModel):
    type: Literal["input_image"] = "input_image"
    image_url: str | None = None
    file_id: str | None = None
    detail: Literal["low", "high", "auto"] = "auto"


class InputFile(WireModel):
    type: Literal["input_file"] = "input_file"
    file_id: str | None = None
    filename: str | None = None
    file_data: str | None = None
    file_url: str | None = None


class TopLogProb(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class LogProb(BaseModel):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogProb] = Field(default_factory=list)


class OutputText(WireModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[dict] = Field(default_factory=list)
    logprobs: list[LogProb] = Field(default_factory=list)


class OutputImage(WireModel):
    """An image an image model made (Modular MAX's part): inline as base64, or a URL this server serves."""

    type: Literal["output_image"] = "output_image"
    image_data: str | None = None  # base64, no `data:` prefix
    image_url: str | None = None
    format: Literal["png", "jpeg", "webp"] = "png"


class Refusal(WireModel):
    type: Literal["refusal"] = "refusal"
    refusal: str


class ReasoningText(BaseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


InputContent = Annotated[InputText | InputImage | InputFile, Field(discriminator="type")]
AssistantContent = Annotated[OutputText | OutputImage | Refusal, Field(discriminator="type")]
OutputContent = Annotated[OutputText | OutputImage, Field(discriminator="type")]
