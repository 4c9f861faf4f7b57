"""From a request to an `ImageRequest`: an image model's request (`provider_options.image`), or a text
model's request that forces OpenAI's `image_generation` tool. Sizes are checked against the pipeline."""

from __future__ import annotations

from respserve.api.errors import InvalidRequestError
from respserve.api.state import AppState, ServedImageModel
from respserve.engine.generation import ImageRequest
from respserve.engine.image_pipeline import ImagePipeline
from respserve.protocol.content import InputText
from respserve.protocol.ids import new_id
from respserve.protocol.items import InputMessage
from respserve.protocol.request import CreateResponseRequest
from respserve.protocol.text_format import TextFormat
from respserve.protocol.tools import HostedToolChoice, ImageGenerationTool

_OPTIONS = "provider_options.image"


def image_prompt(body: CreateResponseRequest) -> str:
    """The prompt is the user's text: `input` itself, or the last user message's text parts."""
    if isinstance(body.input, str):
        prompt = body.input
    else:
        messages = [item for item in body.input if isinstance(item, InputMessage) and item.role == "user"]
        if not messages:
            raise InvalidRequestError("An image request needs a user message with the prompt.", param="input")
        content = messages[-1].content
        prompt = content if isinstance(content, str) else "\n".join(
            part.text for part in content if isinstance(part, InputText)
        )  # fmt: skip
    if not prompt.strip():
        raise InvalidRequestError("The image prompt is empty.", param="input")
    return prompt


def plan_image(body: CreateResponseRequest, served: ServedImageModel, state: AppState) -> ImageRequest:
    """An image model's request: the options come from `provider_options.image`."""
    if body.tools:
        raise InvalidRequestError(f"The image model '{served.name}' does not call tools.", param="tools")
    if body.text is not None and not isinstance(body.text.format, TextFormat):
        raise InvalidRequestError(f"The image model '{served.name}' only makes images.", param="text.format")
    options = body.image_options
    pipeline = served.worker.pipeline
    if options.negative_prompt is not None and not pipeline.accepts_negative_prompt:
        raise InvalidRequestError(
            f"The image model '{served.name}' does not take a negative prompt.", param=f"{_OPTIONS}.negative_prompt"
        )
    width = _side(options.width, pipeline.default_size[0], pipeline, state, f"{_OPTIONS}.width")
    height = _side(options.height, pipeline.default_size[1], pipeline, state, f"{_OPTIONS}.height")
    return ImageRequest(
        request_id=new_id("req"),
        prompt=image_prompt(body),
        width=width,
        height=height,
        steps=options.steps or pipeline.default_steps,
        num_images=options.num_images,
        guidance_scale=options.guidance_scale,
        negative_prompt=options.negative_prompt,
        seed=body.seed,
        output_format=options.output_format,
        output_compression=options.output_compression,
        partial_images=options.partial_images if body.stream else 0,
    )


def forced_image_tool(body: CreateResponseRequest) -> ImageGenerationTool | None:
    """The `image_generation` tool, when `tool_choice` forces it (by type, or `required` with no other tool
    to call); None otherwise."""
    tools = body.tools or []
    image_tools = [tool for tool in tools if isinstance(tool, ImageGenerationTool)]
    if body.tool_choice == "required" and image_tools and len(image_tools) == len(tools):
        return image_tools[0]
    if not isinstance(body.tool_choice, HostedToolChoice):
        return None
    if not image_tools:
        raise InvalidRequestError(
            "tool_choice forces 'image_generation', which is not in 'tools'.", param="tool_choice.type"
        )
    return image_tools[0]


def tool_image_model(tool: ImageGenerationTool, state: AppState) -> ServedImageModel:
    """The image model behind the tool: the one it names if served here, else the first one."""
    served = state.image_models
    if not served:
        raise InvalidRequestError(
            "The image_generation tool needs an image model; this server serves none (see --image-model).",
            param="tools",
            code="unsupported_tool",
        )
    return next((model for model in served if model.name == tool.model), served[0])


def plan_image_tool(
    body: CreateResponseRequest, tool: ImageGenerationTool, served: ServedImageModel, state: AppState
) -> ImageRequest:
    """A forced `image_generation` call: size, format and previews come from the tool's options."""
    pipeline = served.worker.pipeline
    index = next(i for i, candidate in enumerate(body.tools or []) if candidate is tool)
    width = height = None
    if tool.size and tool.size != "auto":
        width, height = (int(side) for side in tool.size.split("x"))
    param = f"tools[{index}].size"
    return ImageRequest(
        request_id=new_id("req"),
        prompt=image_prompt(body),
        width=_side(width, pipeline.default_size[0], pipeline, state, param),
        height=_side(height, pipeline.default_size[1], pipeline, state, param),
        steps=pipeline.default_steps,
        seed=body.seed,
        output_format=tool.output_format or "png",
        output_compression=tool.output_compression,
        partial_images=(tool.partial_images or 0) if body.stream else 0,
    )


def _side(value: int | None, default: int, pipeline: ImagePipeline, state: AppState, param: str) -> int:
    if value is None:
        return default
    multiple, largest = pipeline.size_multiple, state.settings.image_max_side
    if value % multiple or not multiple <= value <= largest:
        raise InvalidRequestError(
            f"{value} is not a valid image side for this model: a multiple of {multiple} from {multiple} to {largest}.",
            param=param,
        )
    return value
