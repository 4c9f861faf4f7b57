"""The one typed settings object, built from a TOML file, `RESPSERVE_*` variables and CLI flags.

Precedence, lowest first: field defaults, the TOML file (`--config` or `RESPSERVE_CONFIG`), environment
variables, then CLI flags (passed in as init arguments).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from platformdirs import user_cache_dir, user_data_dir
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEFAULT_MODEL = "smollm2"


class ModelEntry(BaseModel):
    """One `[[models]]` table of the TOML file. Text comes from `model`; entries here are image models."""

    model_config = ConfigDict(extra="forbid")

    path: str
    id: str | None = None
    kind: Literal["image"] = "image"


@dataclass(frozen=True)
class ImageModelSpec:
    id: str
    path: str


def image_model_spec(path: str, name: str | None = None) -> ImageModelSpec:
    """The model at `path`, named `name` or, without one, after its folder."""
    name = Path(path).name if name is None else name
    if not name or not path:
        raise ValueError(f"image model {path!r}: expected PATH or ID=PATH")
    return ImageModelSpec(id=name, path=path)


def parse_image_model(spec: str) -> ImageModelSpec:
    """`ID=PATH` names the model; a bare `PATH` is named after its folder."""
    name, separator, path = spec.partition("=")
    return image_model_spec(path, name) if separator else image_model_spec(spec)


_MEMORY_UNITS = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9}


def parse_memory_size(setting: str) -> int | float | None:
    """A memory setting (`--kv-cache-memory`): None for "auto", a byte count (int) for "4GiB", "500MB" or
    "1000000", a fraction of free memory (float) for a number up to 1 such as "0.8"."""
    text = setting.strip()
    if text == "auto":
        return None
    if not re.fullmatch(r"\d+(\.\d+)?\s*([kKmMgG]i?[bB])?", text):
        raise ValueError(f"expected bytes (4GiB, 500MB, 1000000), a fraction (0.8) or auto, not {setting!r}")
    text = text.lower().replace(" ", "")
    for unit, scale in _MEMORY_UNITS.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * scale)
    value = float(text)
    return value if value <= 1 else int(value)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RESPSERVE_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    model: str = Field(
        default=DEFAULT_MODEL,
        description="`smollm2` (the embedded default), a transformers folder, a .gguf file or a hub id.",
    )
    served_model_name: str | None = Field(
        default=None, description="Name clients send as `model`; defaults to the model's folder name."
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    cache_dir: Path = Field(
        default_factory=lambda: Path(user_cache_dir("respserve")),
        description="Where converted models are kept (`RESPSERVE_CACHE_DIR`, or `RESPSERVE_CACHE`).",
    )
    data_dir: Path = Field(
        default_factory=lambda: Path(user_data_dir("respserve")),
        description="Where the store (SQLite) keeps responses and conversations.",
    )
    store: str | None = Field(
        default=None,
        description="A postgresql:// URL shared by replicas; none: SQLite in the data dir (`RESPSERVE_STORE`).",
    )
    lease_s: float = Field(
        default=15.0,
        gt=0,
        description="Replicas renew their running responses' leases every third of this; one lease after a "
        "replica dies, the others mark its unfinished responses failed.",
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Keys accepted as 'Authorization: Bearer'; none: no auth. Env: comma-separated.",
    )
    protect_metrics: bool = Field(default=False, description="With API keys set, /metrics needs a key too.")
    secret_key: str | None = Field(
        default=None,
        description="Seals reasoning.encrypted_content; none: a key generated once into the data dir.",
    )
    max_output_tokens: int = Field(
        default=4096, ge=16, description="Cap on one response's output tokens (and the default when none is set)."
    )
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, description="Larger request bodies get 413.")
    max_file_bytes: int = Field(
        default=32 * 1024 * 1024,
        ge=1024,
        description="Largest file an upload (POST /v1/files, 413) or an input_file's file_data (400) may hold.",
    )
    max_file_pages: int = Field(default=500, ge=1, description="A PDF input_file with more pages is a 400.")
    max_file_chars: int = Field(
        default=1_000_000, ge=1, description="An input_file whose text (or a PDF's extracted text) is longer is a 400."
    )
    max_image_pixels: int = Field(
        default=16 * 1024 * 1024,
        ge=1,
        description="A vision model's input image with more pixels (width x height, read from its header) is a 400.",
    )
    allow_image_urls: bool = Field(
        default=False, description="Fetch input_image https:// URLs for vision models (public addresses only)."
    )
    image_url_allow_private: bool = Field(
        default=False, description="With allow_image_urls: also fetch from private, loopback and link-local addresses."
    )
    image_url_timeout_s: float = Field(default=10.0, gt=0, description="Deadline of one image URL's fetch.")
    request_timeout_s: float = Field(
        default=600.0, gt=0, description="A non-streamed generation running longer is stopped (504)."
    )
    shutdown_grace_s: float = Field(default=30.0, ge=0, description="On SIGTERM, how long in-flight work may finish.")
    tool_parser: Literal["hermes", "json"] = Field(
        default="hermes", description="How tool calls are read from output: <tool_call> blocks, or bare JSON."
    )
    reasoning_parser: Literal["auto", "think", "none"] = Field(
        default="auto", description="Read <think> blocks as reasoning items; auto: when the template has them."
    )
    max_running: int = Field(default=64, ge=1, description="Sequences decoded together in one batch.")
    max_queued: int = Field(default=256, ge=0, description="Requests waiting for a slot; past it, 429.")
    max_prefill_tokens: int = Field(
        default=512, ge=1, description="Prompt tokens prefilled per step, in chunks between decode steps."
    )
    tensor_parallel_size: int = Field(
        default=1, ge=1, description="Processes (GPUs) each holding 1/N of every layer of the text model."
    )
    kv_cache_memory: str = Field(
        default="auto",
        description="KV pool size: bytes (4GiB, 500MB), a fraction of free memory (0.8), or auto.",
    )
    cuda_graphs: bool = Field(
        default=True, description="On CUDA, replay decode steps as captured CUDA graphs (per batch and context bucket)."
    )
    decode_attention: Literal["auto", "flex", "gather"] = Field(
        default="auto",
        description="How decode rows read the KV pool: auto (CPU kernel, or flex attention on CUDA), flex, gather.",
    )
    cpu_kernels: bool = Field(
        default=True,
        description="On the CPU in float32, our kernels: bf16-exact weights kept as bf16, decode attention, RMSNorm.",
    )
    image_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Diffusers text-to-image folders (or hub ids), each PATH or ID=PATH. Env: comma-separated.",
    )
    models: list[ModelEntry] = Field(default_factory=list, description="TOML `[[models]]`: more image models.")
    image_compile: bool = Field(default=False, description="torch.compile the image models' denoisers.")
    image_max_batch: int = Field(default=4, ge=1, description="Images generated together in one pipeline call.")
    image_max_side: int = Field(default=2048, ge=64, description="Largest width or height an image request gets.")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_json: bool = Field(default=False, description="Request log lines as JSON objects.")

    @field_validator("api_keys", "image_models", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @field_validator("image_models")
    @classmethod
    def _check_image_models(cls, value: list[str]) -> list[str]:
        for spec in value:
            parse_image_model(spec)
        return value

    @field_validator("kv_cache_memory")
    @classmethod
    def _check_kv_cache_memory(cls, value: str) -> str:
        parse_memory_size(value)
        return value

    @property
    def image_model_specs(self) -> list[ImageModelSpec]:
        specs = [parse_image_model(spec) for spec in self.image_models]
        specs += [image_model_spec(entry.path, entry.id or None) for entry in self.models]
        return specs

    # Set by the CLI or RESPSERVE_CONFIG; read before the other sources (see settings_customise_sources).
    config: Path | None = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_path = _config_path(init_settings, env_settings)
        if toml_path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        return tuple(sources)


def _config_path(*sources: PydanticBaseSettingsSource) -> Path | None:
    for source in sources:
        value = source().get("config")
        if value:
            path = Path(value)
            if not path.is_file():
                raise FileNotFoundError(f"config file not found: {path}")
            return path
    return None


def load_settings(**overrides: object) -> Settings:
    """Build settings; `overrides` are CLI flags, `None` meaning 'not given'."""
    import os

    given = {key: value for key, value in overrides.items() if value is not None}
    # RESPSERVE_CACHE is the documented short name for the cache directory.
    if "cache_dir" not in given and "RESPSERVE_CACHE_DIR" not in os.environ and os.environ.get("RESPSERVE_CACHE"):
        given["cache_dir"] = os.environ["RESPSERVE_CACHE"]
    return Settings(**given)
