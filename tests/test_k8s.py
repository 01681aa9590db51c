"""The Kubernetes manifests (deploy/k8s, a kustomize base), offline: every resource validates
against the pinned Kubernetes version's schemas (kubernetes-validate, strict: no unknown
fields), and what they say agrees with the images and the code: probes on the service's
/ready and /health, the model mounted read-only where the service reads it, non-root, resources,
and an autoscaler and a disruption budget that select the pods they are meant for."""

from __future__ import annotations

from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml
from conftest import REPO

from vehicle_classifier import client as client_mod
from vehicle_classifier import config
from vehicle_classifier.config import ServiceConfig

pytestmark = pytest.mark.unit

K8S_VERSION = "1.35.0"  # the newest schemas kubernetes-validate 1.37.0 ships
BASE = REPO / "deploy" / "k8s"
KUSTOMIZATION = yaml.safe_load((BASE / "kustomization.yaml").read_text())
RESOURCES = [doc for name in KUSTOMIZATION["resources"] for doc in yaml.safe_load_all((BASE / name).read_text()) if doc]


def resource(kind: str, name: str) -> dict:
    (found,) = [r for r in RESOURCES if r["kind"] == kind and r["metadata"]["name"] == name]
    return found


def test_every_file_is_listed_and_every_resource_validates():
    files = sorted(p.name for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(KUSTOMIZATION["resources"]) == files
    assert {(r["kind"]) for r in RESOURCES} >= {"Deployment", "Service", "HorizontalPodAutoscaler",
                                                   "PodDisruptionBudget", "Ingress", "PersistentVolumeClaim"}
    for doc in RESOURCES:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_validation_catches_a_wrong_field():
    bad = {**resource("Deployment", "predict")}
    bad["spec"] = {**bad["spec"], "replica": 2}  # a typo of `replicas`
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def _container(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_predict_pods_probe_mount_and_run_as_the_image_expects():
    deployment = resource("Deployment", "predict")
    pod = deployment["spec"]["template"]["spec"]
    container = _container(deployment)
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
    assert port == urlparse(client_mod.DEFAULT_URL).port == config.DEFAULT_PORT
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["startupProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert "USER 10001" in (REPO / "image-predict.dockerfile").read_text()

    env = {e["name"]: e["value"] for e in container["env"]}
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "models"]
    assert mount["mountPath"] == env["MODEL_DIR"] == "/app/models" and mount["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == "models"]
    assert volume["persistentVolumeClaim"]["readOnly"] is True
    assert resource("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])

    resources = container["resources"]
    assert resources["requests"]["memory"] and resources["limits"]["memory"] and resources["requests"]["cpu"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_every_pod_is_hardened_as_in_compose():
    """Read-only root filesystem, no capabilities, no privilege gain, not root: as
    docker-compose.yml runs the same images (tests/test_stack.py checks that on a real engine),
    with a writable emptyDir exactly where compose gives the container a tmpfs."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    for name, service in (("predict", "predict"), ("page", "streamlit")):
        pod = resource("Deployment", name)["spec"]["template"]["spec"]
        container = _container(resource("Deployment", name))
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                                "capabilities": {"drop": ["ALL"]}}, name
        assert compose[service]["read_only"] is True and compose[service]["cap_drop"] == ["ALL"]
        assert compose[service]["security_opt"] == ["no-new-privileges:true"]
        empty_dirs = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
        writable = sorted(m["mountPath"] for m in container.get("volumeMounts", []) if m["name"] in empty_dirs)
        assert writable == sorted(compose[service].get("tmpfs", [])), name


def test_autoscaler_budget_services_and_ingress_point_at_the_right_pods():
    labels = resource("Deployment", "predict")["spec"]["template"]["metadata"]["labels"]
    hpa = resource("HorizontalPodAutoscaler", "predict")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "predict"}
    assert hpa["spec"]["minReplicas"] >= 2
    pdb = resource("PodDisruptionBudget", "predict")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items() and pdb["spec"]["minAvailable"] >= 1
    assert resource("Service", "predict")["spec"]["selector"].items() <= labels.items()

    page = resource("Deployment", "page")
    page_env = {e["name"]: e["value"] for e in _container(page)["env"]}
    assert page_env["PREDICT_URL"] == f"http://predict:{config.DEFAULT_PORT}"
    page_labels = page["spec"]["template"]["metadata"]["labels"]
    assert resource("Service", "page")["spec"]["selector"].items() <= page_labels.items()

    ingress = resource("Ingress", "vehicle-classifier")
    backends = {p["backend"]["service"]["name"] for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]}
    assert backends == {"predict", "page"}
    annotations = ingress["metadata"]["annotations"]
    assert "non_idempotent" in annotations["nginx.ingress.kubernetes.io/proxy-next-upstream"]
    upload_mb = ServiceConfig().max_upload_bytes // (1024 * 1024)  # the service's MAX_UPLOAD_MB default
    assert annotations["nginx.ingress.kubernetes.io/proxy-body-size"] == f"{upload_mb}m"
    images = {i["name"] for i in KUSTOMIZATION["images"]}
    assert {_container(resource("Deployment", n))["image"] for n in ("predict", "page")} == images
