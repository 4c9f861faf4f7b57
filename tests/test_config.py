"""Settings come from a TOML file, then `RESPSERVE_*` variables, then CLI flags, each overriding the last."""

from __future__ import annotations

from pathlib import Path

import pytest

from respserve.config import ImageModelSpec, load_settings

REPO = Path(__file__).resolve().parents[1]


def test_precedence_toml_env_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "settings.toml"
    toml.write_text('port = 9001\nhost = "0.0.0.0"\ndtype = "float32"\nserved_model_name = "from-toml"\n')
    monkeypatch.setenv("RESPSERVE_PORT", "9002")
    monkeypatch.setenv("RESPSERVE_DTYPE", "float16")
    settings = load_settings(config=str(toml), dtype="bfloat16")
    assert settings.host == "0.0.0.0"  # toml only
    assert settings.served_model_name == "from-toml"
    assert settings.port == 9002  # env beats toml
    assert settings.dtype == "bfloat16"  # the flag beats both


def test_config_file_from_the_environment_and_cache_alias(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "settings.toml"
    toml.write_text("port = 9100\n")
    monkeypatch.setenv("RESPSERVE_CONFIG", str(toml))
    monkeypatch.setenv("RESPSERVE_CACHE", str(tmp_path / "cache"))
    settings = load_settings()
    assert settings.port == 9100
    assert settings.cache_dir == tmp_path / "cache"


def test_shipped_default_config_loads() -> None:
    settings = load_settings(config=str(REPO / "configs" / "default.toml"))
    assert settings.model == "smollm2" and settings.port == 8000


def test_bad_values_are_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESPSERVE_DEVICE", "tpu")
    with pytest.raises(ValueError, match="device"):
        load_settings()


def test_image_models_from_flags_environment_and_toml_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from respserve.cli import _parser

    flags = vars(_parser().parse_args(["serve", "--image-model", "/m/sd-1.5", "--image-model", "flux=/m/FLUX.1"]))
    assert load_settings(image_models=flags["image_models"]).image_model_specs == [
        ImageModelSpec(id="sd-1.5", path="/m/sd-1.5"),
        ImageModelSpec(id="flux", path="/m/FLUX.1"),
    ]
    monkeypatch.setenv("RESPSERVE_IMAGE_MODELS", "a=/x, /y/b/")
    assert [spec.id for spec in load_settings().image_model_specs] == ["a", "b"]
    monkeypatch.delenv("RESPSERVE_IMAGE_MODELS")
    toml = tmp_path / "settings.toml"
    toml.write_text(
        'image_max_batch = 2\n[[models]]\npath = "/m/sd3"\nkind = "image"\n[[models]]\nid = "f"\npath = "/m/f"\n'
    )
    settings = load_settings(config=str(toml))
    assert settings.image_max_batch == 2
    assert settings.image_model_specs == [ImageModelSpec(id="sd3", path="/m/sd3"), ImageModelSpec(id="f", path="/m/f")]
    with pytest.raises(ValueError, match="image_models"):
        load_settings(image_models=["=/no/name"])
