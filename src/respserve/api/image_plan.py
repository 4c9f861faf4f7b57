"""From a request to an `ImageRequest`: an image model's request (`provider_options.image`), or a text
model's request that forces OpenAI's `image_generation` tool. Sizes are checked against the pipeline.

With an `input_image` in the user message the request is an edit (image to image, or inpainting with a
mask): the input is read by edit_images.py, and the output takes its size unless one is asked for.
"""

from __future__ import annotations

from respserve.api.edit_images import EditImages, read_edit_images
from respserve.api.errors import InvalidRequestError
from respserve.api.state import AppState, ServedImageModel
from respserve.engine.generation import ImageEdit, ImageRequest
from respserve.engine.image_pipeline import ImagePipeline
from respserve.protocol.content import InputText
from respserve.protocol.ids import new_id
from respserve.protocol.items import InputMessage
from respserve.protocol.request import CreateResponseRequest
from respserve.protocol.text_format import TextFormat
from respserve.protocol.tools import HostedToolChoice, ImageGenerationTool

_OPTIONS = "provider_options.image"
DEFAULT_STRENGTH = 0.8  # an edit's default: most of the picture's noise is redrawn, its layout stays


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


async def plan_image(
    body: CreateResponseRequest, served: ServedImageModel, state: AppState, owner: str | None
) -> ImageRequest:
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
    prompt = image_prompt(body)
    edit = await read_edit_images(body, options.input_image_mask, f"{_OPTIONS}.input_image_mask", state, owner)
    if edit is None and options.strength is not None:
        raise InvalidRequestError(
            "'strength' applies to edits: send an 'input_image' part with the prompt.", param=f"{_OPTIONS}.strength"
        )
    default_width, default_height = _default_size(edit, pipeline, state)
    width = _side(options.width, default_width, pipeline, state, f"{_OPTIONS}.width")
    height = _side(options.height, default_height, pipeline, state, f"{_OPTIONS}.height")
    steps = options.steps or pipeline.default_steps
    strength_param = f"{_OPTIONS}.{'steps' if options.strength is None else 'strength'}"
    return ImageRequest(
        request_id=new_id("req"),
        prompt=prompt,
        width=width,
        height=height,
        steps=steps,
        num_images=options.num_images,
        guidance_scale=options.guidance_scale,
        negative_prompt=options.negative_prompt,
        seed=body.seed,
        output_format=options.output_format,
        output_compression=options.output_compression,
        partial_images=options.partial_images if body.stream else 0,
        edit=_edit(edit, options.strength, steps, served, (strength_param, f"{_OPTIONS}.input_image_mask")),
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


async def plan_image_tool(
    body: CreateResponseRequest, tool: ImageGenerationTool, served: ServedImageModel, state: AppState, owner: str | None
) -> ImageRequest:
    """A forced `image_generation` call: size, format and previews come from the tool's options; an
    `input_image` with the prompt is edited (unless the tool's `action` is `generate`)."""
    pipeline = served.worker.pipeline
    index = next(i for i, candidate in enumerate(body.tools or []) if candidate is tool)
    prompt = image_prompt(body)
    mask_param = f"tools[{index}].input_image_mask"
    edit = None
    if tool.action != "generate":
        edit = await read_edit_images(body, tool.input_image_mask, mask_param, state, owner)
    if edit is None and tool.action == "edit":
        raise InvalidRequestError(
            "The image_generation tool's action is 'edit', but the user message has no 'input_image'.", param="input"
        )
    width, height = _default_size(edit, pipeline, state)
    param = f"tools[{index}].size"
    if tool.size and tool.size != "auto":
        asked_width, asked_height = (int(side) for side in tool.size.split("x"))
        width = _side(asked_width, width, pipeline, state, param)
        height = _side(asked_height, height, pipeline, state, param)
    return ImageRequest(
        request_id=new_id("req"),
        prompt=prompt,
        width=width,
        height=height,
        steps=pipeline.default_steps,
        seed=body.seed,
        output_format=tool.output_format or "png",
        output_compression=tool.output_compression,
        partial_images=(tool.partial_images or 0) if body.stream else 0,
        edit=_edit(edit, None, pipeline.default_steps, served, (f"tools[{index}]", mask_param)),
    )


def _default_size(edit: EditImages | None, pipeline: ImagePipeline, state: AppState) -> tuple[int, int]:
    """The pipeline's default size; for an edit, the input's, shrunk to fit `--image-max-side` and rounded
    down to the pipeline's size multiple."""
    if edit is None:
        return pipeline.default_size
    multiple = pipeline.size_multiple
    scale = min(1.0, state.settings.image_max_side / max(edit.size))

    def fitted(side: int) -> int:
        return max(multiple, int(side * scale) // multiple * multiple)

    return fitted(edit.size[0]), fitted(edit.size[1])


def _edit(
    edit: EditImages | None,
    strength: float | None,
    steps: int,
    served: ServedImageModel,
    params: tuple[str, str],
) -> ImageEdit | None:
    """The edit to run (None for text to image), checked against the pipeline. `params`: what to name when
    the strength leaves no step to run, and the mask's field."""
    if edit is None:
        return None
    if not served.worker.pipeline.can("edit" if edit.mask is None else "inpaint"):
        what = "image edits (an input_image)" if edit.mask is None else "inpainting (an input_image_mask)"
        raise InvalidRequestError(
            f"The image model '{served.name}' does not do {what}.",
            param="input" if edit.mask is None else params[1],
            code="unsupported_content",
        )
    value = DEFAULT_STRENGTH if strength is None else strength
    # SD's pipelines run int(steps x strength) steps, so none below 1 (flow-matching ones round up).
    if int(steps * value) < 1:
        raise InvalidRequestError(
            f"strength {value:g} of {steps} steps runs no denoising step: steps x strength must reach 1.",
            param=params[0],
        )
    return ImageEdit(edit.image, edit.mask, value)


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
