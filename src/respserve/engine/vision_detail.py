"""`detail` for the Qwen-VL family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), whose image processors see each picture
at its own size within a pixel budget: sides rounded to multiples of patch x merge size, the area kept
between `size["shortest_edge"]` and `size["longest_edge"]` (min and max pixels, despite the names), one
token per (patch x merge)² pixels.

`detail: "low"` caps that budget at `LOW_DETAIL_PIXELS`, 512 x 512 pixels, the size OpenAI's low detail
sees (256 tokens at Qwen3-VL's 32 x 32 pixels a token, 334 at Qwen2-VL's 28 x 28); `"high"` and `"auto"`
keep the processor's own. The processor takes one budget per call, and a prompt's images go through one
call, so a low-detail picture is resized here, before it, to the size the processor would give it under the
capped budget (a size it then keeps): each image of a prompt gets its own detail.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

LOW_DETAIL_PIXELS = 512 * 512


@dataclass(frozen=True)
class PixelBudget:
    """An image processor's sizing rule: sides multiples of `factor`, area in [min_pixels, max_pixels]."""

    factor: int
    min_pixels: int
    max_pixels: int

    @classmethod
    def of(cls, image_processor: Any) -> PixelBudget | None:
        """The budget of a Qwen-VL-style image processor; None for one that sizes pictures otherwise."""
        size = getattr(image_processor, "size", None)
        patch, merge = getattr(image_processor, "patch_size", None), getattr(image_processor, "merge_size", None)
        if size is None or not isinstance(patch, int) or not isinstance(merge, int):
            return None
        low, high = size.get("shortest_edge"), size.get("longest_edge")
        if not isinstance(low, int) or not isinstance(high, int):
            return None
        return cls(patch * merge, low, high)

    def low_detail(self, image: Image.Image) -> Image.Image:
        """`image` at the size the processor gives it under the low-detail cap (itself if that changes nothing)."""
        cap = max(self.min_pixels, min(self.max_pixels, LOW_DETAIL_PIXELS))
        width, height = image.size
        own = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        capped = smart_resize(height, width, self.factor, self.min_pixels, cap)
        if capped == own:
            return image
        # The processor's own resampling (bicubic); it then keeps this size, a multiple of its factor in budget.
        return image.resize((capped[1], capped[0]), Image.Resampling.BICUBIC)
