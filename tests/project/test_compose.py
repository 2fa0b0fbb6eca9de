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

ROOT = Path(__file__).resolve().parents[2]
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


REPLICAS = ("encoder-1", "encoder-2")


def test_compose_has_the_three_services(compose):
    plain = {
        name
        for name, service in compose["services"].items()
        if not set(service.get("profiles", ())) & {"replicas", "replicas-client"}
    }
    assert plain == {"encoder", "client", "prometheus"}
    assert {"valkey", *REPLICAS, "client-replicas"} <= set(compose["services"])


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


def encoder_config(compose, name: str = "encoder") -> ServerConfig:
    from encoder_server.cli import build_parser, config_from_args

    args = build_parser().parse_args(compose["services"][name]["command"])
    return config_from_args(args)


# -- the `replicas` profile: two encoders sharing one Valkey -----------------------------


def test_replicas_share_the_valkey_service_and_keep_their_own_gpu_cache_and_port(compose):
    services = compose["services"]
    valkey = services["valkey"]
    assert valkey["profiles"] == ["replicas"]
    command = valkey["command"]
    assert command[command.index("--maxmemory-policy") + 1] == "allkeys-lru"
    gpus, volumes, ports = set(), set(), set()
    for name in REPLICAS:
        service = services[name]
        config = encoder_config(compose, name)
        assert service["profiles"] == ["replicas"]
        assert config.cache.shared_url == "redis://valkey:6379/0"
        assert config.host == "0.0.0.0" and config.metrics_port is not None
        assert config.auth.api_key_file == f"/run/secrets/{service['secrets'][0]}"
        assert service["depends_on"]["valkey"]["condition"] == "service_healthy"
        assert int(service["stop_grace_period"].rstrip("s")) > config.grace_period_s
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        gpus.add(device["device_ids"][0])
        volumes.update(v.split(":")[0] for v in service["volumes"])
        (port,) = service["ports"]
        host_port, container_port = port.split(":")
        assert int(container_port) == config.port
        ports.add(host_port)
    assert len(gpus) == len(volumes) == len(ports) == len(REPLICAS)
    assert volumes <= set(compose["volumes"])


def test_the_replicas_client_names_both_replicas_in_one_target(compose):
    from dit_client.cli import build_parser

    service = compose["services"]["client-replicas"]
    args = build_parser().parse_args(service["command"])
    addresses = [a.rsplit(":", 1) for a in args.encoder.split(",")]
    assert [host for host, _ in addresses] == list(REPLICAS)
    assert all(int(port) == encoder_config(compose, host).port for host, port in addresses)
    assert {name for name, dep in service["depends_on"].items() if dep["condition"] == "service_healthy"} == set(
        REPLICAS
    )
    # Run explicitly, never by `up`: its own profile.
    assert service["profiles"] == ["replicas-client"]


def test_the_header_shows_how_to_start_the_replicas(compose):
    header = COMPOSE.read_text().split("\nname:")[0]
    assert "docker compose --profile replicas up -d valkey encoder-1 encoder-2" in header
    assert "run --rm client-replicas" in header


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


def _gpu(service: dict) -> dict:
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    return device


def test_each_gpu_service_reserves_its_own_gpu_chosen_by_env(compose):
    encoder, client = _gpu(compose["services"]["encoder"]), _gpu(compose["services"]["client"])
    for device in (encoder, client):
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        # `count: 1` lets Docker hand both services the same GPU on a one-GPU... or any host.
        assert "count" not in device and len(device["device_ids"]) == 1
    defaults = []
    for device, variable in ((encoder, "ENCODER_GPU"), (client, "CLIENT_GPU")):
        match = re.fullmatch(r"\$\{(\w+):-(\d+)\}", device["device_ids"][0])
        assert match and match.group(1) == variable, device["device_ids"]
        defaults.append(match.group(2))
    assert defaults[0] != defaults[1]


def test_the_header_says_every_step_a_fresh_host_needs():
    header = "\n".join(line for line in COMPOSE.read_text().splitlines() if line.startswith("#"))
    for step in (
        "chmod 600 deploy/api-keys.txt",
        "chown 1000 deploy/api-keys.txt",
        "mkdir -p out",
        "FLUX2_UID=$(id -u)",
        "FLUX2_HEALTHCHECK_TLS_CA",
        "ENCODER_GPU",
        "CLIENT_GPU",
    ):
        assert step in header, step


def test_out_is_never_created_by_docker_and_is_written_as_the_host_user(compose):
    client = compose["services"]["client"]
    (out,) = [v for v in client["volumes"] if isinstance(v, dict) and v["target"] == "/out"]
    assert out["type"] == "bind" and out["source"] == "./out" and out["bind"]["create_host_path"] is False
    assert client["user"] == "${FLUX2_UID:-1000}:${FLUX2_GID:-1000}"
    _, instructions = dockerfile(client)
    assert any(i == "RUN" and "chmod 1777 /cache /out" in a for i, a in instructions)


def test_hf_token_is_a_secret_not_an_environment_variable(compose):
    assert compose["secrets"]["hf_token"] == {"environment": "HF_TOKEN"}
    for name in ("encoder", "client"):
        service = compose["services"][name]
        assert "HF_TOKEN" not in service["environment"]
        assert "hf_token" in service["secrets"]
        assert service["environment"]["HF_TOKEN_PATH"] == "/run/secrets/hf_token"


def test_huggingface_hub_reads_the_token_from_the_secret_file(tmp_path):
    token_file = tmp_path / "hf_token"
    token_file.write_text("hf_test_token_0123456789\n")
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env["HF_TOKEN_PATH"] = str(token_file)
    out = subprocess.run(
        [sys.executable, "-c", "import huggingface_hub; print(huggingface_hub.get_token())"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.stdout.strip() == "hf_test_token_0123456789", out.stderr


@pytest.mark.parametrize("name,extras", [("encoder", ["server"]), ("client", ["client", "training"])])
def test_dependencies_install_before_the_code_is_copied(compose, name, extras):
    _, instructions = dockerfile(compose["services"][name])
    steps = [f"{i} {a}" for i, a in instructions]
    install = next(k for k, step in enumerate(steps) if "docker/requirements.py" in step and step.startswith("RUN"))
    copy_all = steps.index("COPY . /app")
    assert install < copy_all, "every code change would reinstall every dependency"
    assert steps[install].split("requirements.py", 1)[1].split(">")[0].split() == extras
    assert all(not s.startswith("COPY") or "pyproject.toml" in s or "requirements.py" in s for s in steps[:install])
    assert "--no-deps" in next(s for s in steps[copy_all:] if "pip install" in s)


def test_requirements_script_lists_core_and_extras_only():
    sys.path.insert(0, str(ROOT / "docker"))
    try:
        from requirements import requirements
    finally:
        sys.path.pop(0)
    server = " ".join(requirements(ROOT / "pyproject.toml", ["server"]))
    client = " ".join(requirements(ROOT / "pyproject.toml", ["client"]))
    # pillow is in both: the client writes PNGs, the server decodes upsampling's reference images.
    assert "aiohttp" in server and "peft" not in server
    assert "peft" in client and "aiohttp" not in client and "prometheus" not in client
    with pytest.raises(SystemExit, match="no extra nope"):
        requirements(ROOT / "pyproject.toml", ["nope"])


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
        if "file" not in secret:
            continue  # read from the environment of `docker compose` (hf_token)
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

    down = subprocess.run(
        [sys.executable, str(script), "--target", f"127.0.0.1:{free_port()}", "--timeout", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert down.returncode == 1 and "UNREACHABLE" in down.stdout


@pytest.fixture()
def tls_health_server(tmp_path):
    """A gRPC server with TLS that reports the TextEncoder service SERVING over grpc.health.v1."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from tests.certs import self_signed

    cert, key = self_signed(tmp_path)
    server = grpc.server(futures.ThreadPoolExecutor(2))
    servicer = health.HealthServicer()
    servicer.set("flux2.encoder.v1.TextEncoder", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())]))
    server.start()
    yield f"127.0.0.1:{port}", cert
    server.stop(0)


def test_health_check_follows_the_tls_setting_from_the_environment(compose, tls_health_server):
    import os

    target, ca = tls_health_server
    test = compose["services"]["encoder"]["healthcheck"]["test"]
    script = ROOT / test[2].removeprefix("/app/")
    args = test[3:]
    args[args.index("--target") + 1] = target
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUX2_HEALTHCHECK_")}
    plain = subprocess.run(
        [sys.executable, str(script), *args, "--timeout", "3"], env=env, capture_output=True, text=True, timeout=60
    )
    assert plain.returncode == 1 and "set FLUX2_HEALTHCHECK_TLS_CA" in plain.stdout
    # The compose file passes these through to the container; the same command then speaks TLS.
    assert {"FLUX2_HEALTHCHECK_TLS_CA", "FLUX2_HEALTHCHECK_TLS_CERT", "FLUX2_HEALTHCHECK_TLS_KEY"} <= set(
        compose["services"]["encoder"]["environment"]
    )
    tls = subprocess.run(
        [sys.executable, str(script), *args],
        env={**env, "FLUX2_HEALTHCHECK_TLS_CA": str(ca)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert tls.returncode == 0 and "SERVING" in tls.stdout, tls.stdout + tls.stderr


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
