"""Every kustomization in k8s/ renders and passes strict validation, offline: core kinds against
Kubernetes' schemas (kubernetes-validate), the CRDs against k8s/schemas, written for this project.
Then what production needs of the rendered objects: probes, shutdown timing, security,
autoscaling, monitoring."""

from __future__ import annotations

import copy
import functools
import json
import shutil
import subprocess

import jsonschema
import kubernetes_validate
import pytest
import yaml
from bentoml._internal.container.generate import BENTO_UID_GID
from helpers import REPO

K8S = REPO / "k8s"
KUSTOMIZATIONS = ["base", *(f"overlays/{p.name}" for p in sorted((K8S / "overlays").iterdir()))]
# The oldest Kubernetes with the preStop `sleep` action on by default, and the newest known.
KUBERNETES_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor_v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule_v1.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject_v1alpha1.json",
}
# service/server/service.py: BentoML's traffic timeout is TAILORGPT_MAX_LATENCY_MS / 1000 + 30 s.
TRAFFIC_TIMEOUT_MARGIN_S = 30


@functools.cache
def render(kustomization: str) -> tuple[dict, ...]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is missing: `make test` installs it (scripts/install-test-tools.sh)"
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S / kustomization)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return tuple(yaml.safe_load_all(out.stdout))


def only(kustomization: str, kind: str) -> dict:
    (found,) = [d for d in render(kustomization) if d["kind"] == kind]
    return found


def container(kustomization: str) -> dict:
    return pod_spec(kustomization)["containers"][0]


def pod_spec(kustomization: str) -> dict:
    return only(kustomization, "Deployment")["spec"]["template"]["spec"]


def env(kustomization: str) -> dict[str, dict]:
    return {e["name"]: e for e in container(kustomization)["env"]}


@functools.cache
def crd_schema(name: str) -> jsonschema.Draft7Validator:
    schema = json.loads((K8S / "schemas" / name).read_text())
    jsonschema.Draft7Validator.check_schema(schema)  # patterns included, as Python's regexes
    return jsonschema.Draft7Validator(schema)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_renders_and_validates_strictly(kustomization: str) -> None:
    for doc in render(kustomization):
        schema = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
        if schema:
            assert doc["metadata"]["name"]
            crd_schema(schema).validate(doc)
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{doc['kind']} in {kustomization}, Kubernetes {version}: {e}")


def _misspelt(doc: dict, path: tuple, old: str, new: str) -> dict:
    """A deep copy of doc with the key `old` of the object at `path` renamed to `new`."""
    doc = copy.deepcopy(doc)
    parent = functools.reduce(lambda d, k: d[k], path, doc)
    parent[new] = parent.pop(old)
    return doc


@pytest.mark.parametrize(
    ("kind", "path", "old", "new"),
    [
        ("ServiceMonitor", ("spec",), "endpoints", "endpoint"),
        ("ServiceMonitor", ("spec", "endpoints", 0), "interval", "scrapeInterval"),
        ("ServiceMonitor", ("spec", "selector"), "matchLabels", "matchLabel"),
        ("PrometheusRule", ("spec", "groups", 0, "rules", 0), "for", "duration"),
        ("PrometheusRule", ("spec", "groups", 0, "rules", 0), "alert", "record"),
        ("ScaledObject", ("spec",), "maxReplicaCount", "maxReplicas"),
        ("ScaledObject", ("spec", "triggers", 0, "metadata"), "threshold", "treshold"),
        ("ScaledObject", ("spec", "advanced", "horizontalPodAutoscalerConfig"), "behavior", "hpa"),
    ],
)
def test_crd_schemas_refuse_a_misspelt_field(kind: str, path: tuple, old: str, new: str) -> None:
    doc = only("overlays/production", kind)
    schema = crd_schema(CRD_SCHEMAS[doc["apiVersion"], kind])
    schema.validate(doc)
    with pytest.raises(jsonschema.ValidationError):
        schema.validate(_misspelt(doc, path, old, new))


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_probes_port_and_service(kustomization: str) -> None:
    c = container(kustomization)
    assert c["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert {"cpu", "memory"} <= set(c["resources"]["requests"])
    assert c["ports"][0]["containerPort"] == 3000
    service = only(kustomization, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == c["ports"][0]["name"]
    labels = only(kustomization, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    for spread in pod_spec(kustomization)["topologySpreadConstraints"]:
        assert spread["labelSelector"]["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_shutdown_outlasts_the_longest_request(kustomization: str) -> None:
    settings = env(kustomization)
    longest_request = int(settings["TAILORGPT_MAX_LATENCY_MS"]["value"]) / 1000
    longest_request += TRAFFIC_TIMEOUT_MARGIN_S
    drain = int(settings["TAILORGPT_DRAIN_SECONDS"]["value"])
    pre_stop = container(kustomization)["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = pod_spec(kustomization)["terminationGracePeriodSeconds"]
    assert longest_request < drain
    assert pre_stop + drain < grace


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_security_context(kustomization: str) -> None:
    pod, c = pod_spec(kustomization), container(kustomization)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == BENTO_UID_GID  # the image's user
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    # Where BentoML writes: its home (stores, Prometheus multiprocess files) and tempfile's.
    empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    mounted = {m["mountPath"] for m in c["volumeMounts"] if m["name"] in empty_dirs}
    assert {"/tmp", env(kustomization)["BENTOML_HOME"]["value"]} <= mounted


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_api_key_comes_from_a_secret(kustomization: str) -> None:
    key = env(kustomization)["TAILORGPT_API_KEY"]
    assert "value" not in key
    assert key["valueFrom"]["secretKeyRef"]["name"] == "tailorgpt-api-key"


def test_production_requires_the_api_key() -> None:
    key = env("overlays/production")["TAILORGPT_API_KEY"]
    assert key["valueFrom"]["secretKeyRef"]["optional"] is False


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_disruption_budget_and_one_autoscaler(kustomization: str) -> None:
    docs = render(kustomization)
    kinds = [d["kind"] for d in docs]
    assert "PodDisruptionBudget" in kinds
    autoscalers = [d for d in docs if d["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")]
    assert len(autoscalers) == 1, "two autoscalers on one Deployment fight"
    assert autoscalers[0]["spec"]["scaleTargetRef"]["name"] == "tailorgpt"


def test_keda_scales_on_queue_length() -> None:
    triggers = only("overlays/production", "ScaledObject")["spec"]["triggers"]
    queries = [t["metadata"]["query"] for t in triggers if t["type"] == "prometheus"]
    assert queries and all("tailorgpt_queue_length" in q for q in queries)


def test_gpu_overlay() -> None:
    settings = env("overlays/gpu")
    assert settings["TAILORGPT_VARIANT"]["value"] == "fp16"
    assert settings["TAILORGPT_DEVICE"]["value"] == "cuda"
    assert container("overlays/gpu")["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in pod_spec("overlays/gpu")["tolerations"])
    assert env("overlays/cpu")["TAILORGPT_DEVICE"]["value"] == "cpu"


@pytest.mark.parametrize("kustomization", ["overlays/cpu", "overlays/gpu", "overlays/production"])
def test_monitoring_objects(kustomization: str) -> None:
    monitor = only(kustomization, "ServiceMonitor")
    service = only(kustomization, "Service")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports
    # One source: the rules and dashboard are monitoring/'s files, as they stand.
    alerts = yaml.safe_load((REPO / "monitoring" / "alerts.yaml").read_text())
    assert only(kustomization, "PrometheusRule")["spec"] == alerts["spec"]
    dashboard = only(kustomization, "ConfigMap")["data"]["tailorgpt.json"]
    assert json.loads(dashboard) == json.loads((REPO / "monitoring" / "dashboard.json").read_text())


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_image_and_model(kustomization: str) -> None:
    image = container(kustomization)["image"]
    assert image.rpartition(":")[0].endswith("tailorgpt") and ":" in image
    assert env(kustomization)["TAILORGPT_MODEL"]["value"]
