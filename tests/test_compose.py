"""docker-compose.yml, the Dockerfiles and deploy/: everything they name exists and runs the tested entry points.

Docker's engine is not available on the test machines, so these tests check
what can be checked without it: the files parse, every file they reference is
in the repository, the commands parse with the same CLI parsers the other
tests drive, and the container health check works against a live server.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from common.config import ServerConfig
from encoder_server.auth import KeyFileError, load_api_keys

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
# Files an operator creates from a committed example (secrets stay out of git).
OPERATOR_FILES = {"deploy/api-keys.txt": "deploy/api-keys.example.txt"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def console_scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def dockerfile(service: dict) -> tuple[Path, list[tuple[str, str]]]:
    """Path and (instruction, arguments) list of a service's Dockerfile, continuation lines joined."""
    build = service["build"]
    path = ROOT / build["context"] / build["dockerfile"]
    text = re.sub(r"\\\n", " ", path.read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            instructions.append((word.upper(), rest.strip()))
    return path, instructions


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"use the exec form (JSON list) so signals reach the process: {args}"
    return value


def entrypoint(service: dict) -> list[str]:
    _, instructions = dockerfile(service)
    return exec_form([a for i, a in instructions if i == "ENTRYPOINT"][-1])


def test_compose_has_the_three_services(compose):
    assert set(compose["services"]) == {"encoder", "client", "prometheus"}


def test_build_files_and_copied_paths_exist(compose):
    for name in ("encoder", "client"):
        path, instructions = dockerfile(compose["services"][name])
        assert path.is_file()
        assert path.with_name(path.name + ".dockerignore").is_file()
        for instruction, args in instructions:
            if instruction == "COPY":
                for source in shlex.split(args)[:-1]:
                    if not source.startswith("--"):
                        assert (ROOT / source).exists(), f"{path.name} copies {source}, which is not in the repo"


def test_images_run_the_console_scripts_the_tests_run(compose, console_scripts):
    assert entrypoint(compose["services"]["encoder"]) == ["flux2-encoder"]
    assert entrypoint(compose["services"]["client"]) == ["flux2-dit"]
    assert console_scripts["flux2-encoder"] == "encoder_server.cli:main"
    assert console_scripts["flux2-dit"] == "dit_client.cli:main"


def encoder_config(compose) -> ServerConfig:
    from encoder_server.cli import build_parser, config_from_args

    args = build_parser().parse_args(compose["services"]["encoder"]["command"])
    return config_from_args(args)


def test_encoder_command_parses_with_the_real_cli(compose):
    config = encoder_config(compose)
    service = compose["services"]["encoder"]
    secret = service["secrets"][0]
    assert config.auth.api_key_file == f"/run/secrets/{secret}"
    assert secret in compose["secrets"]
    # Published ports are the ones the server binds, on all interfaces inside the container.
    published = {int(p.split(":")[-1]) for p in service["ports"]}
    assert published == {config.port, config.http.port}
    assert config.host == "0.0.0.0" and config.http.host == "0.0.0.0"
    assert config.metrics_port is not None and config.cache.dir.startswith("/cache/")
    assert any(v.endswith(":/cache") for v in service["volumes"])
    # Docker sends SIGKILL after stop_grace_period: it must outlast the drain.
    assert int(service["stop_grace_period"].rstrip("s")) > config.grace_period_s


def test_encoder_reserves_a_gpu(compose):
    devices = compose["services"]["encoder"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


def test_client_command_parses_with_the_real_cli_and_targets_the_encoder(compose):
    from dit_client.cli import build_parser

    service = compose["services"]["client"]
    args = build_parser().parse_args(service["command"])
    assert args.command == "generate"
    host, port = args.encoder.rsplit(":", 1)
    assert host == "encoder" and int(port) == encoder_config(compose).port
    assert service["depends_on"]["encoder"]["condition"] == "service_healthy"
    assert "FLUX2_API_KEY" in service["environment"]


def test_prometheus_scrapes_the_metrics_port(compose):
    service = compose["services"]["prometheus"]
    mounts = [v for v in service["volumes"] if v.startswith("./")]
    for mount in mounts:
        source = mount.split(":")[0]
        assert (ROOT / source).is_file(), f"prometheus mounts {source}, which is not in the repo"
    config = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    job = config["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"encoder:{encoder_config(compose).metrics_port}"]


def test_secret_files_exist_or_have_a_committed_example(compose):
    for name, secret in compose["secrets"].items():
        path = secret["file"].removeprefix("./")
        if path in OPERATOR_FILES:
            assert (ROOT / OPERATOR_FILES[path]).is_file()
        else:
            assert (ROOT / path).is_file(), f"secret {name} names {path}, which is not in the repo"


def test_example_keys_file_holds_no_usable_key():
    # Copying the example unchanged must fail loudly, never start with a published key.
    with pytest.raises(KeyFileError, match="holds no 'user:key' line"):
        load_api_keys(ROOT / "deploy/api-keys.example.txt")


def test_health_check_script_reports_serving_and_unreachable(compose, server):
    test = compose["services"]["encoder"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "/app/docker/healthcheck.py"]
    script = ROOT / test[2].removeprefix("/app/")  # the Dockerfiles copy the repo to /app
    args = test[3:]
    args[args.index("--target") + 1] = server.target
    ok = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "SERVING" in ok.stdout
    from dit_client.demo import free_port

    down = subprocess.run([sys.executable, str(script), "--target", f"127.0.0.1:{free_port()}", "--timeout", "1"],
                          capture_output=True, text=True, timeout=60)
    assert down.returncode == 1 and "UNREACHABLE" in down.stdout


def _has_docker_compose() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30).returncode == 0


@pytest.mark.skipif(not _has_docker_compose(), reason="needs the docker compose plugin (not installed here)")
def test_docker_compose_config_accepts_the_file():
    keys = ROOT / "deploy/api-keys.txt"
    created = not keys.exists()
    if created:
        keys.write_text("ci:" + "x" * 32 + "\n")
    try:
        subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "-q"], check=True, timeout=60)
    finally:
        if created:
            keys.unlink()
