"""A diffusers text-to-image pipeline on its device: loading, one batched call, and previews from latents.

Any folder `AutoPipelineForText2Image` loads works (Stable Diffusion, SDXL, SD3, Flux, Flux2). What differs
between them and matters to requests is read off the loaded pipeline: the size multiple, the default
size, steps and guidance, and whether it takes a negative prompt.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from respserve.engine.device import pick_device, pick_dtype

logger = logging.getLogger(__name__)

# Called after each denoising step with (steps done, latents); returns True to stop the call early.
StepCallback = Callable[[int, torch.Tensor], bool]


class ImagePipeline:
    """Owns a diffusers pipeline; called only from the image worker thread."""

    def __init__(self, pipe: Any, device: torch.device) -> None:
        self.pipe = pipe
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
        pipeline = cls(pipe, torch_device)
        if compile:
            denoiser_name = "transformer" if getattr(pipe, "transformer", None) is not None else "unet"
            setattr(pipe, denoiser_name, torch.compile(getattr(pipe, denoiser_name)))
        logger.info(
            "loaded %s (%s) on %s (%s) in %.2f s",
            path,
            type(pipe).__name__,
            torch_device,
            str(torch_dtype).removeprefix("torch."),
            time.perf_counter() - started,
        )
        return pipeline

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
    ) -> list[Image.Image]:
        """One pipeline call for the whole batch: image i is `prompts[i]` drawn from `seeds[i]`."""
        pipe = self.pipe
        # Generators on the CPU: the same seed gives the same image on any device.
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]

        def callback(pipe: Any, step: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if on_step(step + 1, tensors["latents"]):
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


def _default(parameters: Any, name: str, fallback: float) -> float:
    parameter = parameters.get(name)
    if parameter is None or parameter.default in (inspect.Parameter.empty, None):
        return fallback
    return parameter.default
