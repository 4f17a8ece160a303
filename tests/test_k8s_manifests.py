"""docker/k8s/ validated offline: Kubernetes kinds against the Kubernetes OpenAPI schemas
(`kubernetes-validate`, strict: unknown fields fail), the two CRDs (KEDA ScaledObject, Prometheus
Operator ServiceMonitor) against the schemas written down in docker/k8s/schemas/, and the contracts
between the files and the server (probe paths, grace period vs drain, ports, selectors, metric names)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from casa_live.server.metrics import Metrics
from casa_live.server.settings import Settings

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="pip install kubernetes-validate (test extra)"
)

K8S = Path(__file__).resolve().parents[1] / "docker" / "k8s"
VERSION = "1.30.0"  # the oldest Kubernetes these manifests target
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject.keda.sh.v1alpha1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.monitoring.coreos.com.v1.json",
}


def load(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def docs() -> list[tuple[str, dict]]:
    out = []
    for path in sorted([*K8S.glob("*.yaml"), *K8S.glob("alternatives/*.yaml")]):
        if path.name != "kustomization.yaml":
            out += [(str(path.relative_to(K8S)), d) for d in load(str(path.relative_to(K8S)))]
    return out


def one(kind: str) -> dict:
    (doc,) = [d for _, d in docs() if d["kind"] == kind and d["apiVersion"] != "autoscaling/v2"]
    return doc


def validate(doc: dict) -> None:
    key = (doc["apiVersion"], doc["kind"])
    if key in CRD_SCHEMAS:
        schema = json.loads((K8S / "schemas" / CRD_SCHEMAS[key]).read_text())
        jsonschema.validate(doc, schema)
    else:
        kubernetes_validate.validate(doc, VERSION, strict=True)


@pytest.mark.parametrize(("name", "doc"), docs(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_every_manifest_validates(name: str, doc: dict) -> None:
    validate(doc)


def test_the_schemas_refuse_mistakes() -> None:
    """Strict validation, so each check below can fail: an unknown field, a wrong type."""
    bad_deploy = copy.deepcopy(one("Deployment"))
    bad_deploy["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    bad_scaled = copy.deepcopy(one("ScaledObject"))
    bad_scaled["spec"]["minReplicas"] = 2  # the HPA's name for it, not KEDA's
    bad_trigger = copy.deepcopy(one("ScaledObject"))
    bad_trigger["spec"]["triggers"][0]["metadata"]["threshold"] = 24  # KEDA metadata values are strings
    bad_monitor = copy.deepcopy(one("ServiceMonitor"))
    bad_monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    for doc in (bad_deploy, bad_scaled, bad_trigger, bad_monitor):
        with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
            validate(doc)


def test_crd_parts_that_are_kubernetes_types_validate_as_such() -> None:
    scaled, monitor = one("ScaledObject"), one("ServiceMonitor")
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "x"},
           "spec": {"scaleTargetRef": scaled["spec"]["scaleTargetRef"], "maxReplicas": 2, "behavior": behavior}}  # fmt: skip
    kubernetes_validate.validate(hpa, VERSION, strict=True)
    pdb = {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": "x"},
           "spec": {"maxUnavailable": 1, "selector": monitor["spec"]["selector"]}}  # fmt: skip
    kubernetes_validate.validate(pdb, VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    (kust,) = load("kustomization.yaml")
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files


# ------------------------------------------------------------------------------------ contracts


def container() -> dict:
    (c,) = one("Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def env() -> dict[str, str]:
    return {e["name"]: e["value"] for e in container()["env"] if "value" in e}


def test_env_names_are_server_settings_and_parse() -> None:
    for e in container()["env"]:
        assert e["name"].startswith("CASA_") and e["name"][5:].lower() in Settings.model_fields, e["name"]
    settings = Settings(**{k[5:].lower(): v for k, v in env().items()})
    assert settings.drain_seconds == 30 and settings.max_sessions == 32


def test_probes_grace_period_and_prestop_cover_the_drain() -> None:
    spec = one("Deployment")["spec"]["template"]["spec"]
    c = container()
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["readinessProbe"]["failureThreshold"] == 1 and c["readinessProbe"]["periodSeconds"] <= 5
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop, drain = float(command[1]), float(env()["CASA_DRAIN_SECONDS"])
    assert pre_stop >= 5
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + drain + 10  # room for the exit itself


def test_pod_is_non_root_read_only_and_has_a_gpu() -> None:
    spec = one("Deployment")["spec"]["template"]["spec"]
    c = container()
    assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] == 10001
    sc = c["securityContext"]
    assert (
        sc["readOnlyRootFilesystem"]
        and not sc["allowPrivilegeEscalation"]
        and sc["capabilities"]["drop"] == ["ALL"]
    )
    assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/tmp"}
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert env()["CASA_DEVICE"] == "cuda"
    rollout = one("Deployment")["spec"]["strategy"]["rollingUpdate"]
    assert rollout["maxUnavailable"] == 0  # capacity never dips during a rollout


def test_service_ingress_pdb_and_monitor_point_at_the_pods() -> None:
    labels = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    port_names = {p["name"] for p in container()["ports"]}
    svc, ing, pdb, mon = one("Service"), one("Ingress"), one("PodDisruptionBudget"), one("ServiceMonitor")
    assert svc["spec"]["selector"].items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= port_names
    svc_ports = {p["name"] for p in svc["spec"]["ports"]}
    (path,) = ing["spec"]["rules"][0]["http"]["paths"]
    assert path["backend"]["service"]["name"] == svc["metadata"]["name"]
    assert path["backend"]["service"]["port"]["name"] in svc_ports
    assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert {e["port"] for e in mon["spec"]["endpoints"]} <= svc_ports
    assert mon["spec"]["endpoints"][0]["path"] == "/metrics"


def test_ingress_annotations_keep_websockets_open_and_unbuffered() -> None:
    notes = one("Ingress")["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    idle = Settings().idle_timeout_seconds
    assert (
        int(notes[prefix + "proxy-read-timeout"]) > idle and int(notes[prefix + "proxy-send-timeout"]) > idle
    )
    assert notes[prefix + "proxy-buffering"] == "off" and notes[prefix + "proxy-request-buffering"] == "off"


def test_autoscaling_reads_a_real_metric_and_scales_down_slowly() -> None:
    scaled = one("ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == one("Deployment")["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    exposition = Metrics().render().decode()
    metric = trigger["metadata"]["query"].split("(")[1].split("{")[0]
    assert f"# TYPE {metric} gauge" in exposition  # the query names a gauge the server exports
    assert trigger["metricType"] == "AverageValue"
    assert (
        0 < float(trigger["metadata"]["threshold"]) < int(env()["CASA_MAX_SESSIONS"])
    )  # headroom per replica
    down = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= 600
    assert all(p["type"] == "Pods" and p["value"] == 1 for p in down["policies"])
    assert scaled["spec"]["minReplicaCount"] >= 2  # one replica drains while another serves
    (hpa,) = load("alternatives/hpa.yaml")
    assert hpa["spec"]["behavior"] == scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == metric
