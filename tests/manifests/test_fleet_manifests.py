"""manifests/components/fleet (through overlays/cpu-fleet): Envoy, KEDA and the predictor as one fleet.

Built with ``kubectl kustomize`` and checked against the real schemas (KServe and KEDA v2.20.2
CRDs in ``../shared/schemas``, ``kubernetes-validate`` for built-in kinds), then for the wiring
that no schema sees: Envoy's upstream is the headless Service of the predictor's pods, the
ScaledObject scales the Deployment KServe makes and is the only scaler, the ports agree.
"""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.manifests.test_manifests import (
    K8S_VERSION,
    KSERVE_KINDS,
    MANIFESTS,
    SCHEMAS,
    build,
    crd_errors,
    isvc_of,
    kserve_container,
)

KEDA_CRD = SCHEMAS / "keda-v2.20.2-crd-scaledobjects.yaml"


@pytest.fixture(scope="module")
def fleet() -> list[dict[str, Any]]:
    return build(MANIFESTS / "overlays" / "cpu-fleet")


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def envoy_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    config_map = next(
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("top-tagger-envoy")
    )
    return yaml.safe_load(config_map["data"]["envoy.yaml"])


def socket_addresses(node: Any) -> list[dict[str, Any]]:
    if isinstance(node, dict):
        found = [node["socket_address"]] if isinstance(node.get("socket_address"), dict) else []
        return found + [a for value in node.values() for a in socket_addresses(value)]
    if isinstance(node, list):
        return [a for value in node for a in socket_addresses(value)]
    return []


def test_builds_with_the_fleet_kinds(fleet: list[dict[str, Any]]) -> None:
    assert {d["metadata"].get("namespace") for d in fleet} == {"kubeflow"}, "one namespace for the whole fleet"
    kinds = sorted(d["kind"] for d in fleet)
    assert kinds == sorted(
        [
            *("InferenceService", "Role", "Role", "RoleBinding", "RoleBinding", "ServiceAccount"),
            *("ConfigMap", "Deployment", "ScaledObject", "Service", "Service"),
        ]
    )


def test_kserve_and_builtin_kinds_validate(fleet: list[dict[str, Any]], crd_schemas: dict[str, Any]) -> None:
    for doc in fleet:
        if doc["kind"] in KSERVE_KINDS:
            assert crd_errors(doc, crd_schemas) == [], doc["metadata"]["name"]
        elif doc["kind"] != "ScaledObject":
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.fixture(scope="module")
def keda_schema() -> dict[str, Any]:
    if not KEDA_CRD.exists():
        pytest.skip(f"KEDA's CRDs not found at {KEDA_CRD}")
    crd = yaml.safe_load(KEDA_CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return {f"{crd['spec']['group']}/v1alpha1/{crd['spec']['names']['kind']}": version["schema"]["openAPIV3Schema"]}


def test_scaled_object_validates_against_kedas_crd(fleet: list[dict[str, Any]], keda_schema: dict[str, Any]) -> None:
    scaled = one(fleet, "ScaledObject")
    assert crd_errors(scaled, keda_schema) == []
    broken = yaml.safe_load(yaml.safe_dump(scaled))
    del broken["spec"]["scaleTargetRef"]["name"]
    broken["spec"]["pollingInterval"] = "30s"
    errors = crd_errors(broken, keda_schema)
    assert any("'name' is a required property" in e for e in errors) and any("pollingInterval" in e for e in errors)


def test_keda_is_the_only_scaler_and_scales_on_queue_latency(fleet: list[dict[str, Any]]) -> None:
    isvc = isvc_of(fleet)
    annotations = isvc["metadata"]["annotations"]
    assert annotations["serving.kserve.io/autoscalerClass"] == "external", "else KServe makes a second scaler"
    assert "autoScaling" not in isvc["spec"]["predictor"]
    scaled = one(fleet, "ScaledObject")
    target = scaled["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", f"{isvc['metadata']['name']}-predictor")
    (trigger,) = scaled["spec"]["triggers"]
    query = trigger["metadata"]["query"]
    assert trigger["type"] == "prometheus" and float(trigger["metadata"]["threshold"]) > 0
    assert "nv_inference_queue_duration_us" in query and "nv_inference_exec_count" in query
    assert (
        scaled["spec"]["minReplicaCount"] >= 1 and scaled["spec"]["maxReplicaCount"] > scaled["spec"]["minReplicaCount"]
    )


def test_keda_and_envoys_admission_read_one_metric_from_one_prometheus(fleet: list[dict[str, Any]]) -> None:
    from serving.fleet.envoy_config import (
        CLUSTER_PROMETHEUS_HOST,
        CLUSTER_PROMETHEUS_PORT,
        DEFAULT_THRESHOLD_MS,
        scaling_metric,
    )
    from toptagger.constants import MODEL_NAME

    (trigger,) = one(fleet, "ScaledObject")["spec"]["triggers"]
    assert " ".join(trigger["metadata"]["query"].split()) == " ".join(scaling_metric("model", MODEL_NAME, 30).split())
    assert float(trigger["metadata"]["threshold"]) == DEFAULT_THRESHOLD_MS
    assert trigger["metadata"]["serverAddress"] == f"http://{CLUSTER_PROMETHEUS_HOST}:{CLUSTER_PROMETHEUS_PORT}"
    prometheus = [a for a in socket_addresses(envoy_config(fleet)) if a.get("address") == CLUSTER_PROMETHEUS_HOST]
    assert prometheus and all(a["port_value"] == CLUSTER_PROMETHEUS_PORT for a in prometheus)


def test_predictor_serves_metrics_and_drains_within_its_grace(fleet: list[dict[str, Any]]) -> None:
    isvc = isvc_of(fleet)
    container = kserve_container(isvc)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert ports["metrics"] == int(env["METRICS_PORT"]) == 8002
    predictor = isvc["spec"]["predictor"]
    assert predictor["annotations"]["prometheus.io/port"] == "8002"
    assert 0 < float(env["DRAIN_SECONDS"]) < predictor["terminationGracePeriodSeconds"]
    assert {8080, 8081} <= set(ports.values()), "the base's ports are kept"


def test_envoy_reaches_every_pod_through_the_headless_service(fleet: list[dict[str, Any]]) -> None:
    isvc = isvc_of(fleet)
    replicas = one(fleet, "Service", "top-tagger-replicas")
    assert replicas["spec"]["clusterIP"] == "None", "a cluster IP would hide the pods from Envoy"
    # the labels KServe's Standard mode puts on the predictor's pods
    assert replicas["spec"]["selector"] == {
        "serving.kserve.io/inferenceservice": isvc["metadata"]["name"],
        "component": "predictor",
    }
    service_ports = {p["port"] for p in replicas["spec"]["ports"]}
    container_ports = {p["containerPort"] for p in kserve_container(isvc)["ports"]}
    assert service_ports <= container_ports
    namespace = replicas["metadata"]["namespace"]
    upstreams = [a for a in socket_addresses(envoy_config(fleet)) if "top-tagger-replicas" in str(a.get("address"))]
    assert upstreams, "Envoy's cluster must name the headless Service"
    for address in upstreams:
        host = address["address"]
        assert host in (
            "top-tagger-replicas",
            f"top-tagger-replicas.{namespace}",
            f"top-tagger-replicas.{namespace}.svc.cluster.local",
        )
        assert address["port_value"] in service_ports


def test_envoy_listens_where_its_service_points(fleet: list[dict[str, Any]]) -> None:
    config = envoy_config(fleet)
    listening = {
        listener["address"]["socket_address"]["port_value"] for listener in config["static_resources"]["listeners"]
    }
    envoy = one(fleet, "Deployment", "top-tagger-envoy")
    (container,) = envoy["spec"]["template"]["spec"]["containers"]
    service = one(fleet, "Service", "top-tagger-fleet")
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= listening
    assert {p["containerPort"] for p in container["ports"]} <= listening
    assert {p["port"] for p in service["spec"]["ports"]} == {8000, 8001}, "Triton's ports, as SuperSONIC's Envoy"
    assert service["spec"]["selector"] == envoy["spec"]["selector"]["matchLabels"]
    volume = envoy["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"]
    assert volume.startswith("top-tagger-envoy"), "the generated ConfigMap's hashed name is substituted"
    image = container["image"]
    assert image.rpartition(":")[2] not in ("", "latest")
    assert envoy["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
