"""deploy/k8s/: the manifests are valid Kubernetes objects and agree with each other and with the code.

No cluster is needed: every object is checked against the Kubernetes JSON schemas that
kubernetes-validate bundles (offline, strict: unknown fields are errors), and the
references between objects (selectors, ports, Secret names, the Redis URL, the Job's
shard) are checked here, along with the command lines, which must parse with the
same CLI parsers the other tests drive.
"""

from __future__ import annotations

import argparse
import copy
import re
import socket
import textwrap
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, ValidationError, latest_version

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy/k8s"
# The oldest Kubernetes the manifests are written for (gRPC probes, Indexed Jobs, autoscaling/v2,
# policy/v1 and unhealthyPodEvictionPolicy all exist there), and the newest the validator knows.
VERSIONS = ("1.28.0", latest_version())
# Flags other parts of issue 12 are adding. Until a parser knows one, its value is checked here
# and the flag left out of the parse; once the parser has it, the full command line must parse.
PENDING_FLAGS = {"serve": set(), "precompute": {"--shard"}}


def _documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


MANIFEST_FILES = sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")
KUSTOMIZATIONS = sorted(K8S.rglob("kustomization.yaml"))
OBJECTS = [(p, d) for p in MANIFEST_FILES for d in _documents(p)]


def _id(item) -> str:
    path, doc = item
    return f"{path.relative_to(K8S)}:{doc['kind']}/{doc['metadata']['name']}"


def one(kind: str, name: str | None = None) -> dict:
    found = [d for _, d in OBJECTS if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


ENCODER = one("Deployment", "flux2-encoder")
REDIS = one("Deployment", "flux2-redis")
JOB = one("Job", "flux2-precompute")


def container(workload: dict) -> dict:
    (c,) = workload["spec"]["template"]["spec"]["containers"]
    return c


def flags(args: list[str]) -> dict[str, str]:
    """``--name=value`` and ``--name value`` arguments as a dict (the last one wins)."""
    out, i = {}, 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            if not eq and i + 1 < len(args) and not args[i + 1].startswith("--"):
                value, i = args[i + 1], i + 1
            out[name] = value
        i += 1
    return out


def selects(selector: dict, labels: dict) -> bool:
    """Whether a Service's selector map, or a LabelSelector of matchLabels, matches ``labels``."""
    assert "matchExpressions" not in selector, "only matchLabels are checked here"
    match = selector.get("matchLabels", selector)
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


def pod_labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"]["labels"]


# --- schema -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("item", OBJECTS, ids=[_id(o) for o in OBJECTS])
def test_every_object_validates_against_the_kubernetes_schema(item, version):
    path, doc = item
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except ValidationError as err:
        pytest.fail(f"{path.relative_to(ROOT)}: {'.'.join(map(str, err.path))}: {err.message}")
    except SchemaNotFoundError as err:  # an unknown kind or apiVersion is a failure, not a warning
        pytest.fail(f"{path.relative_to(ROOT)}: {err.message}")


def test_the_validator_rejects_what_a_cluster_would_and_needs_no_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    kubernetes_validate.validate(ENCODER, VERSIONS[-1], strict=True)
    broken = []
    typo = copy.deepcopy(ENCODER)
    typo["spec"]["replica"] = 2  # unknown field
    broken.append(typo)
    nested_typo = copy.deepcopy(ENCODER)
    container(nested_typo)["readinesProbe"] = container(nested_typo).pop("readinessProbe")
    broken.append(nested_typo)
    bad_port = copy.deepcopy(ENCODER)
    container(bad_port)["readinessProbe"]["grpc"]["port"] = "grpc"  # grpc probes take a number only
    broken.append(bad_port)
    no_selector = copy.deepcopy(ENCODER)
    del no_selector["spec"]["selector"]
    broken.append(no_selector)
    for doc in broken:
        with pytest.raises(ValidationError):
            kubernetes_validate.validate(doc, VERSIONS[-1], strict=True)
    with pytest.raises(SchemaNotFoundError):
        kubernetes_validate.validate({**ENCODER, "apiVersion": "apps/v1beta1"}, VERSIONS[-1], strict=True)


# --- kustomize ----------------------------------------------------------------------------------------


def test_every_manifest_is_in_exactly_one_kustomization_and_every_entry_exists():
    listed = []
    for kustomization in KUSTOMIZATIONS:
        k = yaml.safe_load(kustomization.read_text())
        assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
        assert k["namespace"] == one("Namespace")["metadata"]["name"]
        for entry in k["resources"]:
            path = (kustomization.parent / entry).resolve()
            assert path.is_file(), f"{kustomization.relative_to(ROOT)} lists {entry}, which is not there"
            assert K8S in path.parents, f"{entry} is outside deploy/k8s (kustomize refuses it by default)"
            listed.append(path)
    assert sorted(listed) == MANIFEST_FILES, "a manifest is in no kustomization, or in two"
    main = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert "namespace.yaml" in main["resources"]
    # The one-off Job is not started by `kubectl apply -k deploy/k8s/`.
    assert all(_documents(K8S / e)[0]["kind"] != "Job" for e in main["resources"])


def test_names_are_unique_per_kind_and_no_object_sets_its_own_namespace():
    seen = set()
    for path, doc in OBJECTS:
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in seen, key
        seen.add(key)
        if doc["kind"] != "Namespace":
            assert "namespace" not in doc["metadata"], f"{path.name}: kustomization.yaml sets the namespace"
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "flux2-remote"


# --- the encoder's command line, against the real CLI -------------------------------------------------


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[name]


def _without_pending(command: str, parser: argparse.ArgumentParser, args: list[str]) -> list[str]:
    """``args`` less the pending flags this parser does not know yet (exact names, not argparse prefixes)."""
    unknown = {f for f in PENDING_FLAGS[command] if f not in parser._option_string_actions}
    return [a for a in args if a.split("=", 1)[0] not in unknown]


def encoder_env() -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(ENCODER)["env"] if "value" in e}


@pytest.fixture()
def encoder_config(monkeypatch):
    """The ServerConfig the encoder pod runs with: its args and its FLUX2_* variables, through the real CLI."""
    from encoder_server.cli import build_parser, config_from_args

    for name in [n for n in __import__("os").environ if n.startswith("FLUX2_")]:
        monkeypatch.delenv(name)
    for name, value in encoder_env().items():
        monkeypatch.setenv(name, value)
    parser = build_parser()  # reads the FLUX2_* defaults now
    args = container(ENCODER)["args"]
    assert args[0] == "serve"
    return config_from_args(
        parser.parse_args(["serve", *_without_pending("serve", _subparser(parser, "serve"), args[1:])])
    )


def test_every_flux2_variable_is_a_serve_flag():
    from encoder_server.cli import build_parser, env_name

    serve = _subparser(build_parser(), "serve")
    known = {env_name(a.dest) for a in serve._actions if a.option_strings and a.dest != "help"}
    used = {n for n in encoder_env() if n.startswith("FLUX2_")}
    assert used and used <= known, f"not flags of `flux2-encoder serve`: {sorted(used - known)}"
    # A variable and a flag for the same setting would hide one of them (the flag wins).
    flag_dests = {f.lstrip("-").replace("-", "_") for f in flags(container(ENCODER)["args"][1:])}
    assert not {env_name(d) for d in flag_dests} & used


def test_encoder_command_and_environment_parse_with_the_real_cli(encoder_config):
    config = encoder_config
    assert config.host == "0.0.0.0" and config.port == 50051
    assert config.http.host == "0.0.0.0" and config.http.port == 8080
    assert config.metrics_port == 9100
    assert str(config.device) == "cuda"
    assert config.auth.api_key_file == "/etc/flux2/keys/api-keys.txt"
    # The pod is killed terminationGracePeriodSeconds after SIGTERM: the drain must end first.
    assert ENCODER["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > config.grace_period_s


def test_encoder_ports_probes_and_args_agree(encoder_config):
    c = container(ENCODER)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {
        "grpc": encoder_config.port,
        "http": encoder_config.http.port,
        "metrics": encoder_config.metrics_port,
    }
    from common.protocol import SERVICE_NAME

    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == encoder_config.port, probe
    # Readiness asks for the TextEncoder service, which turns NOT_SERVING while draining.
    assert c["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    assert c["startupProbe"]["grpc"]["service"] == SERVICE_NAME
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 30 * 60  # the first start downloads weights
    annotations = ENCODER["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(encoder_config.metrics_port)
    assert flags(c["args"][1:])["--metrics-host"] == "0.0.0.0"


def test_encoder_asks_for_one_gpu():
    resources = container(ENCODER)["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) == 1
    assert encoder_env()["FLUX2_DEVICE"] == "cuda"


def test_api_keys_come_from_the_secret_as_a_file_the_server_refuses_unedited(tmp_path):
    from encoder_server.auth import KeyFileError, load_api_keys

    spec = ENCODER["spec"]["template"]["spec"]
    key_file = flags(container(ENCODER)["args"][1:])["--api-key-file"]
    (mount,) = [m for m in container(ENCODER)["volumeMounts"] if key_file.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mount["readOnly"] is True
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    secret = one("Secret", volume["secret"]["secretName"])
    (item,) = [i for i in volume["secret"]["items"] if f"{mount['mountPath'].rstrip('/')}/{i['path']}" == key_file]
    text = secret["stringData"][item["key"]]
    # Readable by the server's uid through the group (fsGroup), by nobody else.
    assert volume["secret"]["defaultMode"] == 0o440
    assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsUser"] == 1000
    # The committed example is a placeholder: applied unchanged, the server refuses to start.
    example = tmp_path / "api-keys.txt"
    example.write_text(text)
    with pytest.raises(KeyFileError):
        load_api_keys(example)


def test_shared_cache_url_names_the_redis_service_and_port(encoder_config):
    url = flags(container(ENCODER)["args"][1:])["--shared-cache"]
    assert encoder_config.cache.shared_url == url
    parts = urlsplit(url)
    assert parts.scheme == "redis" and parts.path == "/0"
    service = one("Service", parts.hostname)
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == parts.port]
    assert selects(service["spec"]["selector"], pod_labels(REDIS))
    redis_ports = {p["name"]: p["containerPort"] for p in container(REDIS)["ports"]}
    assert redis_ports[port["targetPort"]] == parts.port


def test_redis_is_an_lru_cache_without_persistence():
    c = container(REDIS)
    assert c["command"] == ["redis-server"]
    args = flags(c["args"])
    assert args["--maxmemory-policy"] == "allkeys-lru"
    assert args["--save"] == "" and args["--appendonly"] == "no"
    assert int(args["--port"]) == c["ports"][0]["containerPort"]
    # maxmemory leaves room under the container's memory limit.
    maxmemory = int(re.fullmatch(r"(\d+)gb", args["--maxmemory"]).group(1))
    limit = int(re.fullmatch(r"(\d+)Gi", c["resources"]["limits"]["memory"]).group(1))
    assert maxmemory < limit
    assert REDIS["spec"]["replicas"] == 1


def test_only_the_encoders_reach_redis():
    policy = one("NetworkPolicy")
    assert selects(policy["spec"]["podSelector"], pod_labels(REDIS))
    (rule,) = policy["spec"]["ingress"]
    (source,) = rule["from"]
    assert selects(source["podSelector"], pod_labels(ENCODER))
    assert not selects(source["podSelector"], pod_labels(REDIS)) and not selects(source["podSelector"], pod_labels(JOB))
    assert [p["port"] for p in rule["ports"]] == [container(REDIS)["ports"][0]["containerPort"]]


def test_the_headless_service_selects_the_encoder_pods_on_its_grpc_port(encoder_config):
    service = one("Service", "flux2-encoder")
    assert service["spec"]["clusterIP"] == "None"
    assert selects(service["spec"]["selector"], pod_labels(ENCODER))
    assert not selects(service["spec"]["selector"], pod_labels(REDIS))
    assert selects(ENCODER["spec"]["selector"], pod_labels(ENCODER))
    names = {p["name"] for p in container(ENCODER)["ports"]}
    grpc = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert grpc["port"] == encoder_config.port and grpc["targetPort"] in names
    assert all(p["targetPort"] in names for p in service["spec"]["ports"])


def test_the_pdb_covers_the_encoder_pods_and_lets_one_go():
    pdb = one("PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"], pod_labels(ENCODER))
    assert pdb["spec"]["maxUnavailable"] == 1


def test_the_hpa_scales_the_encoder_on_the_queue_metric_the_server_exports():
    from encoder_server.metrics import EncoderMetrics

    hpa = one("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", "flux2-encoder")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert name == "flux2_encoder_queue_size"
    exported = {m.name for m in EncoderMetrics().registry.collect()}
    assert name in exported
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    # The HPA owns the count; a `replicas:` in the Deployment would be reset by every apply.
    assert "replicas" not in ENCODER["spec"]
    assert "prometheus-adapter" in (K8S / "encoder-hpa.yaml").read_text()


def test_the_images_are_the_ones_docker_compose_builds():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert container(ENCODER)["image"] == compose["services"]["encoder"]["image"]
    assert container(JOB)["image"] == compose["services"]["client"]["image"]


# --- the precompute Job -------------------------------------------------------------------------------


def test_the_job_is_indexed_and_each_index_takes_its_shard():
    spec = JOB["spec"]
    assert spec["completionMode"] == "Indexed"
    n = spec["completions"]
    assert 1 <= spec["parallelism"] <= n
    args = flags(container(JOB)["args"][1:])
    assert args["--shard"] == f"$(JOB_COMPLETION_INDEX)/{n}"
    # One writer per store: each index has its own folder.
    assert "$(JOB_COMPLETION_INDEX)" in args["--out"]
    # $(VAR) in args expands only for variables of the container's env.
    env = {e["name"]: e for e in container(JOB)["env"]}
    field = env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert field == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert env["FLUX2_API_KEY"]["valueFrom"]["secretKeyRef"]["name"]
    assert spec["template"]["spec"]["restartPolicy"] in ("Never", "OnFailure")
    assert "nvidia.com/gpu" not in container(JOB)["resources"].get("limits", {})


def test_the_job_reaches_every_encoder_through_the_headless_service_dns(encoder_config):
    namespace = one("Namespace")["metadata"]["name"]
    service = one("Service", "flux2-encoder")["metadata"]["name"]
    target = flags(container(JOB)["args"][1:])["--encoder"]
    assert target == f"dns:///{service}.{namespace}.svc.cluster.local:{encoder_config.port}"


def test_the_job_command_parses_with_the_real_cli():
    from dit_client.cli import build_parser

    parser = build_parser()
    args = container(JOB)["args"]
    assert args[0] == "precompute"
    # The Job's own shell-less expansion, done here: index 3 of N.
    expanded = [a.replace("$(JOB_COMPLETION_INDEX)", "3") for a in args]
    parsed = parser.parse_args(
        ["precompute", *_without_pending("precompute", _subparser(parser, "precompute"), expanded[1:])]
    )
    assert parsed.command == "precompute" and parsed.out.endswith("part-3")
    shard = _subparser(parser, "precompute")._option_string_actions.get("--shard")
    if shard is not None:  # PENDING_FLAGS: parsed above once the flag exists
        assert "3" in str(getattr(parsed, shard.dest))


def test_docs_show_the_kubernetes_path():
    docs = (ROOT / "docs/replicas.md").read_text()
    section = docs.split("\n## Kubernetes", 1)[1].split("\n## ", 1)[0]
    assert "kubectl apply -k deploy/k8s/" in section
    assert "dns:///flux2-encoder.flux2.svc.cluster.local:50051" in section
    for path in MANIFEST_FILES:
        assert path.name in section, f"docs/replicas.md#kubernetes does not mention {path.name}"


# --- kubectl's own kustomize, where kubectl is installed (it is not a dependency) -----------------------


def _kubectl() -> str | None:
    import shutil

    return shutil.which("kubectl")


def _kustomize(folder: Path) -> list[dict]:
    import subprocess

    done = subprocess.run([_kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@pytest.mark.skipif(_kubectl() is None, reason="needs kubectl (its built-in kustomize); not installed here")
def test_kubectl_kustomize_builds_the_objects_in_the_namespace():
    namespace = one("Namespace")["metadata"]["name"]
    for kustomization in KUSTOMIZATIONS:
        built = _kustomize(kustomization.parent)
        files = [kustomization.parent / e for e in yaml.safe_load(kustomization.read_text())["resources"]]
        expected = [d for f in files for d in _documents(f)]
        assert len(built) == len(expected)
        for doc in expected:
            (out,) = [b for b in built if (b["kind"], b["metadata"]["name"]) == (doc["kind"], doc["metadata"]["name"])]
            if doc["kind"] != "Namespace":
                assert out["metadata"]["namespace"] == namespace
            assert out["spec" if "spec" in doc else "kind"] == doc["spec" if "spec" in doc else "kind"]


@pytest.mark.skipif(_kubectl() is None, reason="needs kubectl (its built-in kustomize); not installed here")
def test_the_documented_overlay_replaces_the_placeholder_keys(tmp_path):
    import base64

    docs = (ROOT / "docs/replicas.md").read_text()
    block = re.search(r"\n( *)```yaml\n(\1# my-flux2/kustomization\.yaml.*?)\1```", docs, flags=re.S)
    assert block, "docs/replicas.md lost its overlay example"
    overlay = textwrap.dedent(block.group(2))
    (tmp_path / "flux2-remote").symlink_to(ROOT)
    mine = tmp_path / "my-flux2"
    mine.mkdir()
    (mine / "kustomization.yaml").write_text(overlay)
    (mine / "api-keys.txt").write_text("alice:" + "k" * 32 + "\n")
    built = _kustomize(mine)
    (secret,) = [d for d in built if d["kind"] == "Secret"]
    assert secret["metadata"]["name"] == one("Secret")["metadata"]["name"]
    assert "stringData" not in secret
    assert base64.b64decode(secret["data"]["api-keys.txt"]).decode() == "alice:" + "k" * 32 + "\n"
