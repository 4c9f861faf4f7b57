"""Diffusers text-to-image pipelines with random weights, built from configs and saved to a folder.

No model weights can be downloaded here, so the tests and scripts/bench_images.py build their image pipelines
from configs with random weights instead, and load the saved folder with
`diffusers.AutoPipelineForText2Image.from_pretrained(folder)` exactly as they would load a real checkpoint.
The images are noise, but deterministic for a seed. Tokenizers are made without downloads too: a byte-level
CLIP vocabulary with no merges, and a T5 unigram vocabulary of single characters.

    python scripts/random_pipelines.py tiny-sd /tmp/tiny-sd     # also tiny-flux, tiny-sd3, sd-large

The tiny pipelines (under 10 MB each) use a 4-block VAE, so vae_scale_factor is 8 as in the real models, and
their defaults give 64x64 images (Flux's default is hard-wired in diffusers: 128 * 8 = 1024x1024).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import string
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

SEED = 0
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512

__all__ = ["TINY_BUILDERS", "build", "build_flux", "build_sd", "build_sd3", "build_sd_large", "main"]


# --- tokenizers ---------------------------------------------------------------------------------------------


def clip_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP tokenizer with no merges: every byte is a token, with and without `</w>`.

    Ids 0-511 are the 256 bytes then the 256 bytes with `</w>`; 512 is `<|startoftext|>` and 513 is
    `<|endoftext|>` (also the padding), the highest id as in the real CLIP vocabulary.
    """
    alphabet = sorted(ByteLevel.alphabet())
    pieces = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)


CLIP_VOCAB_SIZE = 2 * 256 + 2
CLIP_BOS_ID = 512
CLIP_EOS_ID = 513


def t5_tokenizer() -> T5Tokenizer:
    """A T5 unigram tokenizer over printable ASCII: `<pad>`=0, `</s>`=1, `<unk>`=2, then characters."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for ch in string.digits + string.ascii_letters + string.punctuation:
        pieces.append((ch, -3.0))
        pieces.append(("\u2581" + ch, -2.5))
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)


T5_VOCAB_SIZE = 256  # >= len(t5_tokenizer()), which is 192


# --- model pieces -------------------------------------------------------------------------------------------


def _clip_config(hidden: int, layers: int, heads: int, intermediate: int, projection: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        projection_dim=projection,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="quick_gelu",
        bos_token_id=CLIP_BOS_ID,
        eos_token_id=CLIP_EOS_ID,
        pad_token_id=CLIP_EOS_ID,
    )


def _tiny_t5(d_model: int) -> T5EncoderModel:
    config = T5Config(
        vocab_size=T5_VOCAB_SIZE,
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def _tiny_vae(latent_channels: int, **kwargs: object) -> AutoencoderKL:
    """A 4-block VAE (vae_scale_factor 8, as in the real models) with very few channels."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=latent_channels,
        sample_size=64,
        **kwargs,
    )


def _sd_scheduler() -> DPMSolverMultistepScheduler:
    # Stable Diffusion 1.x's training schedule.
    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
    )


def _sd_pipeline(
    unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel
) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=_sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _save(pipe: object, folder: Path) -> Path:
    for module in pipe.components.values():  # type: ignore[attr-defined]
        if isinstance(module, torch.nn.Module):
            module.eval()
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(folder, safe_serialization=True)  # type: ignore[attr-defined]
    return folder


# --- builders -----------------------------------------------------------------------------------------------


def build_sd(folder: Path) -> Path:
    """A tiny StableDiffusionPipeline: UNet (32, 64), CLIP text encoder hidden 32, 4-block VAE.

    vae_scale_factor 8, unet sample_size 8: the default size is 64x64, width/height must be multiples of 8.
    """
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = _tiny_vae(latent_channels=4, scaling_factor=0.18215)
    text_encoder = CLIPTextModel(_clip_config(hidden=32, layers=2, heads=4, intermediate=64, projection=32))
    return _save(_sd_pipeline(unet, vae, text_encoder), folder)


def build_flux(folder: Path) -> Path:
    """A tiny FluxPipeline (FLUX.1-dev-shaped: guidance embedding, 16 latent channels packed 2x2).

    vae_scale_factor 8: width/height must be multiples of 16. The default size is hard-wired in diffusers
    (default_sample_size 128 -> 1024x1024), so always pass height/width.
    """
    torch.manual_seed(SEED)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels * 2 * 2 packing
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5 d_model
        pooled_projection_dim=32,  # CLIP hidden size
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),  # sums to attention_head_dim
    )
    vae = _tiny_vae(
        latent_channels=16,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    text_encoder = CLIPTextModel(_clip_config(hidden=32, layers=2, heads=4, intermediate=64, projection=32))
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        text_encoder_2=_tiny_t5(d_model=32),
        tokenizer_2=t5_tokenizer(),
        transformer=transformer,
    )
    return _save(pipe, folder)


def build_sd3(folder: Path) -> Path:
    """A tiny StableDiffusion3Pipeline: SD3 transformer (patch 2), two CLIP encoders with projection, a T5.

    vae_scale_factor 8, patch_size 2, sample_size 8: the default size is 64x64, width/height must be
    multiples of 16.
    """
    torch.manual_seed(SEED)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=64,  # T5 d_model; the two CLIP hidden states (32 + 32) are padded to it
        pooled_projection_dim=64,  # the two CLIP projections, 32 + 32
        pos_embed_max_size=96,
    )
    vae = _tiny_vae(
        latent_channels=16,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    clip_1 = CLIPTextModelWithProjection(_clip_config(hidden=32, layers=2, heads=4, intermediate=64, projection=32))
    clip_2 = CLIPTextModelWithProjection(_clip_config(hidden=32, layers=2, heads=4, intermediate=64, projection=32))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae,
        text_encoder=clip_1,
        tokenizer=clip_tokenizer(),
        text_encoder_2=clip_2,
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=_tiny_t5(d_model=64),
        tokenizer_3=t5_tokenizer(),
    )
    return _save(pipe, folder)


def build_sd_large(folder: Path) -> Path:
    """A Stable-Diffusion-1.5-shaped pipeline with random weights, saved in float16 (about 2 GB), for GPU benchmarks.

    UNet (320, 640, 1280, 1280) with cross_attention_dim 768, CLIP text encoder 768 x 12 layers (full 49408-token
    embedding, though the byte-level tokenizer uses only 514 ids), the SD VAE (128, 256, 512, 512). The default
    size is 512x512; width/height must be multiples of 8. Load it with `dtype=torch.float16` on a GPU (without a
    dtype, diffusers loads the UNet and VAE in float32 but transformers keeps the text encoder in float16).
    """
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
        scaling_factor=0.18215,
    )
    config = _clip_config(hidden=768, layers=12, heads=12, intermediate=3072, projection=768)
    config.vocab_size = 49408
    text_encoder = CLIPTextModel(config)
    pipe = _sd_pipeline(unet, vae, text_encoder)
    for module in (unet, vae, text_encoder):
        module.half()  # not .to(float16), which makes diffusers warn about (no) modules kept in float32
    return _save(pipe, folder)


TINY_BUILDERS: dict[str, Callable[[Path], Path]] = {"tiny-sd": build_sd, "tiny-flux": build_flux, "tiny-sd3": build_sd3}
BUILDERS: dict[str, Callable[[Path], Path]] = {**TINY_BUILDERS, "sd-large": build_sd_large}


def build(kind: str, folder: Path) -> Path:
    """Build pipeline `kind` (a key of BUILDERS) into `folder`, unless `folder/model_index.json` already exists.

    The pipeline is built in a temporary sibling folder and renamed into place, so a half-written folder is
    never seen; when two processes race, the first rename wins and the other build is thrown away.
    """
    if kind not in BUILDERS:
        raise ValueError(f"unknown pipeline kind {kind!r}; expected one of {sorted(BUILDERS)}")
    folder = Path(folder)
    if (folder / "model_index.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        BUILDERS[kind](tmp)
        json.loads((tmp / "model_index.json").read_text())  # fail here, not at load time, if it is broken
        if folder.exists() and not any(folder.iterdir()):
            folder.rmdir()
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _size_on_disk(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=sorted(BUILDERS))
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    folder = build(args.kind, args.folder)
    print(f"{folder}\t{_size_on_disk(folder) / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
