"""A diffusers text-to-image pipeline on its device: loading, one batched call, and previews from latents.

Any folder `AutoPipelineForText2Image` loads works (Stable Diffusion, SDXL, SD3, Flux, Flux2). What differs
between them and matters to requests is read off the loaded pipeline: the size multiple, the default
size, steps and guidance, and whether it takes a negative prompt.

Edits run the same components through the family's image-to-image and inpainting pipelines
(`AutoPipelineFor{Image2Image,Inpainting}.from_pipe`: the weights are shared, not copied); a family without
them (Flux2) makes only images from text.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from respserve.engine.device import pick_device, pick_dtype
from respserve.engine.generation import ImageKind

logger = logging.getLogger(__name__)

# Called after each denoising step with (steps done, steps this call runs, latents); returns True to stop the
# call early. An edit runs fewer steps than asked (diffusers skips those above its strength, rounding as
# each family does), so the count comes from the running pipeline.
StepCallback = Callable[[int, int, torch.Tensor], bool]


class ImagePipeline:
    """Owns a diffusers pipeline; called only from the image worker thread."""

    def __init__(self, pipe: Any, device: torch.device) -> None:
        self.pipe = pipe
        self.pipes: dict[ImageKind, Any] = {"generate": pipe, **_edit_pipes(pipe)}
        self.device = device
        self.dtype: torch.dtype = next(self._denoiser.parameters()).dtype
        self.vae_scale_factor = int(getattr(pipe, "vae_scale_factor", 8))
        self.size_multiple = self.vae_scale_factor * self._patch_size()
        defaults = inspect.signature(pipe.__call__).parameters
        # Flux takes a negative prompt but ignores it unless true CFG is on (`true_cfg_scale` > 1), which
        # doubles the work; rather than ignore it silently, such pipelines refuse it.
        self.accepts_negative_prompt = "negative_prompt" in defaults and "true_cfg_scale" not in defaults
        self.default_steps = int(_default(defaults, "num_inference_steps", 28))
        self.default_guidance_scale = float(_default(defaults, "guidance_scale", 5.0))
        side = self._default_side()
        self.default_size = (side, side)
        self._previews_work = True

    @classmethod
    def load(cls, path: Path, device: str = "auto", dtype: str = "auto", compile: bool = False) -> ImagePipeline:
        # Imported here: diffusers takes seconds to import, and a text-only server never needs it.
        from diffusers import AutoPipelineForText2Image

        torch_device = pick_device(device)
        torch_dtype = pick_dtype(dtype, torch_device)
        started = time.perf_counter()
        pipe = AutoPipelineForText2Image.from_pretrained(path, dtype=torch_dtype).to(torch_device)
        pipe.set_progress_bar_config(disable=True)
        if compile:  # before the edit pipelines are made, so that they share the compiled denoiser
            denoiser_name = "transformer" if getattr(pipe, "transformer", None) is not None else "unet"
            setattr(pipe, denoiser_name, torch.compile(getattr(pipe, denoiser_name)))
        pipeline = cls(pipe, torch_device)
        logger.info(
            "loaded %s (%s%s) on %s (%s) in %.2f s",
            path,
            type(pipe).__name__,
            "".join(f", {type(variant).__name__}" for kind, variant in pipeline.pipes.items() if kind != "generate"),
            torch_device,
            str(torch_dtype).removeprefix("torch."),
            time.perf_counter() - started,
        )
        return pipeline

    def can(self, kind: ImageKind) -> bool:
        """Whether this model runs requests of `kind` (image edits and inpainting need their pipelines)."""
        return kind in self.pipes

    @property
    def _denoiser(self) -> torch.nn.Module:
        transformer = getattr(self.pipe, "transformer", None)
        return transformer if transformer is not None else self.pipe.unet

    def _patch_size(self) -> int:
        if "Flux" in type(self.pipe).__name__:
            return 2  # Flux packs 2x2 latent patches into one token
        return int(getattr(self._denoiser.config, "patch_size", None) or 1)

    def _default_side(self) -> int:
        config = self._denoiser.config
        sample_size = getattr(self.pipe, "default_sample_size", None) or getattr(config, "sample_size", 64)
        side = int(sample_size) * self.vae_scale_factor
        return max(self.size_multiple, side - side % self.size_multiple)

    def generate(
        self,
        prompts: list[str],
        negative_prompts: list[str] | None,
        seeds: list[int],
        width: int,
        height: int,
        steps: int,
        guidance_scale: float,
        on_step: StepCallback,
        edit: EditBatch | None = None,
    ) -> list[Image.Image]:
        """One pipeline call for the whole batch: image i is `prompts[i]` drawn from `seeds[i]`, from noise or,
        with `edit`, from `edit.images[i]` (and `edit.masks[i]`)."""
        pipe = self.pipes["generate" if edit is None else edit.kind]
        # Generators on the CPU: the same seed gives the same image on any device.
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]

        def callback(pipe: Any, step: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if on_step(step + 1, getattr(pipe, "num_timesteps", None) or steps, tensors["latents"]):
                pipe._interrupt = True  # every pipeline checks `interrupt` before its next step
            return tensors

        arguments: dict[str, Any] = {
            "prompt": prompts,
            "width": width,
            "height": height,
            "num_inference_steps": steps,
            "guidance_scale": guidance_scale,
            "generator": generators,
            "callback_on_step_end": callback,
            "output_type": "pil",
        }
        if negative_prompts is not None:
            arguments["negative_prompt"] = negative_prompts
        if edit is not None:
            arguments.update(edit.arguments(width, height))
            if "height" not in inspect.signature(pipe.__call__).parameters:  # SD's img2img: the image's size
                del arguments["width"], arguments["height"]
        with torch.inference_mode():
            return list(pipe(**arguments).images)

    def preview(self, latents: torch.Tensor, width: int, height: int) -> list[Image.Image]:
        """Decodes intermediate latents with the VAE; [] for a pipeline whose latents we cannot decode."""
        if not self._previews_work:
            return []
        pipe = self.pipe
        try:
            with torch.inference_mode():
                if latents.ndim == 3:  # packed into tokens (Flux): back to a latent image
                    latents = pipe._unpack_latents(latents, height, width, self.vae_scale_factor)
                config = pipe.vae.config
                latents = latents / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)
                decoded = pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]
                return list(pipe.image_processor.postprocess(decoded, output_type="pil"))
        except Exception:  # noqa: BLE001 - previews are optional; the final image does not depend on them
            logger.warning("%s: intermediate latents do not decode; no previews", type(pipe).__name__, exc_info=True)
            self._previews_work = False
            return []


@dataclass(frozen=True)
class EditBatch:
    """The pictures of a batch of edits, one per image of the call, and their strength."""

    images: list[Image.Image]
    masks: list[Image.Image] | None  # inpainting
    strength: float

    @property
    def kind(self) -> ImageKind:
        return "edit" if self.masks is None else "inpaint"

    def arguments(self, width: int, height: int) -> dict[str, Any]:
        """The pipeline's arguments: the pictures at the output size (a mask resized as its image was)."""
        size = (width, height)
        arguments: dict[str, Any] = {
            "image": [
                image if image.size == size else image.resize(size, Image.Resampling.LANCZOS) for image in self.images
            ],
            "strength": self.strength,
        }
        if self.masks is not None:
            arguments["mask_image"] = [mask if mask.size == size else mask.resize(size) for mask in self.masks]
        return arguments


def _edit_pipes(pipe: Any) -> dict[ImageKind, Any]:
    """The family's image-to-image and inpainting pipelines over `pipe`'s components, where it has them."""
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    pipes: dict[ImageKind, Any] = {}
    for kind, auto in (("edit", AutoPipelineForImage2Image), ("inpaint", AutoPipelineForInpainting)):
        try:
            variant = auto.from_pipe(pipe)
        except Exception as exc:  # noqa: BLE001 - the family has no such pipeline (ValueError): it makes no edits
            logger.info("%s: no %s pipeline (%s)", type(pipe).__name__, kind, exc)
            continue
        variant.set_progress_bar_config(disable=True)
        pipes[kind] = variant
    return pipes


def _default(parameters: Any, name: str, fallback: float) -> float:
    parameter = parameters.get(name)
    if parameter is None or parameter.default in (inspect.Parameter.empty, None):
        return fallback
    return parameter.default
