"""The kustomize tree under manifests/: builds, validates against the real schemas, secure by default.

Everything here runs offline: ``kubectl kustomize`` builds the overlays, KServe's own CRD OpenAPI
schemas (a copy in ``../shared/schemas/`` beside the checkout) check the InferenceServices, and
``kubernetes-validate`` checks the built-in kinds.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
SCHEMAS = REPO.parent / "shared" / "schemas"
OVERLAYS = ("cpu", "gpu", "fpga")
KSERVE_KINDS = {"InferenceService": "inferenceservices", "ServingRuntime": "servingruntimes"}
K8S_VERSION = "1.33.0"  # a current Kubernetes release known to kubernetes-validate 1.37


def build(directory: Path) -> list[dict[str, Any]]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed; it builds the kustomize overlays")
    result = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def built() -> dict[str, list[dict[str, Any]]]:
    return {overlay: build(MANIFESTS / "overlays" / overlay) for overlay in OVERLAYS}


def isvc_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == "InferenceService"]
    assert len(found) == 1, f"expected one InferenceService, got {len(found)}"
    return found[0]


def kserve_container(isvc: dict[str, Any]) -> dict[str, Any]:
    containers = isvc["spec"]["predictor"]["containers"]
    assert [c["name"] for c in containers] == ["kserve-container"]
    return containers[0]


def pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every pod-like spec in a manifest: the predictor of an InferenceService, pod templates."""
    if doc.get("kind") == "InferenceService":
        return [doc["spec"][part] for part in ("predictor", "transformer", "explainer") if part in doc["spec"]]
    if doc.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return [doc["spec"]["template"]["spec"]]
    if doc.get("kind") == "Pod":
        return [doc["spec"]]
    return []


def all_yaml_docs() -> list[tuple[Path, dict[str, Any]]]:
    """Every YAML document in manifests/, also those outside any kustomization (templates)."""
    docs = []
    for path in sorted(MANIFESTS.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict):
                docs.append((path, doc))
    return docs


# ---------------------------------------------------------------------------------------------
# Builds and schemas


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds_with_expected_kinds(built: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    kinds = sorted(d["kind"] for d in built[overlay])
    assert kinds == ["InferenceService", "Role", "Role", "RoleBinding", "RoleBinding", "ServiceAccount"]


def crd_errors(doc: dict[str, Any], schemas: dict[str, dict[str, Any]]) -> list[str]:
    key = f"{doc['apiVersion']}/{doc['kind']}"
    assert key in schemas, f"no CRD schema for {key}"
    validator = jsonschema.Draft7Validator(schemas[key])
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kserve_resources_match_their_crd(
    built: dict[str, list[dict[str, Any]]], crd_schemas: dict[str, dict[str, Any]], overlay: str
) -> None:
    kserve_docs = [d for d in built[overlay] if d["kind"] in KSERVE_KINDS]
    assert kserve_docs
    for doc in kserve_docs:
        assert crd_errors(doc, crd_schemas) == [], f"{doc['kind']} {doc['metadata']['name']} ({overlay})"


def test_crd_validation_catches_mistakes(
    built: dict[str, list[dict[str, Any]]], crd_schemas: dict[str, dict[str, Any]]
) -> None:
    """The schema check is live: typical mistakes in an InferenceService are reported."""
    isvc = isvc_of(built["cpu"])
    broken = yaml.safe_load(yaml.safe_dump(isvc))
    broken["spec"]["predictor"]["scaleMetric"] = "latency"  # not one of cpu, memory, concurrency, rps
    broken["spec"]["predictor"]["containers"][0]["ports"][1]["containerPort"] = "8081"  # a string
    del broken["spec"]["predictor"]["autoScaling"]["metrics"][0]["type"]  # required
    errors = crd_errors(broken, crd_schemas)
    assert any("scaleMetric" in e for e in errors), errors
    assert any("containerPort" in e for e in errors), errors
    assert any("'type' is a required property" in e for e in errors), errors


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_kinds_validate(built: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    builtin = [d for d in built[overlay] if d["kind"] not in KSERVE_KINDS]
    assert builtin
    for doc in builtin:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_builtin_validation_catches_mistakes(built: dict[str, list[dict[str, Any]]]) -> None:
    role = next(d for d in built["cpu"] if d["kind"] == "Role")
    broken = {**role, "rules": [{"apiGroups": ["serving.kserve.io"], "resources": "inferenceservices"}]}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


# ---------------------------------------------------------------------------------------------
# The predictor contract


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_predictor_contract(built: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    isvc = isvc_of(built[overlay])
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert isvc["metadata"]["name"] == "top-tagger"
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    container = kserve_container(isvc)
    assert container["command"] == ["python", "-m", "serving"]
    ports = {p["containerPort"]: p for p in container["ports"]}
    assert set(ports) == {8080, 8081}
    assert ports[8081]["name"] == "h2c"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PROTOCOL"] == "v2"
    assert env["STORAGE_URI"].startswith("s3://")
    assert env["MODEL_URI"] == "/mnt/models"
    for name in ("MAX_BATCH_SIZE", "MAX_LATENCY_MS", "MAX_QUEUE"):
        assert int(env[name]) >= 1, name
    # PoCL needs a writable cache under the read-only root filesystem.
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    for name in ("POCL_CACHE_DIR", "XDG_CACHE_HOME", "HOME"):
        assert any(env[name].startswith(m) for m in mounts), f"{name}={env[name]} is not on a mounted volume"
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"])
    predictor = isvc["spec"]["predictor"]
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    assert isvc["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "keda"
    (metric,) = predictor["autoScaling"]["metrics"]
    assert metric["external"]["target"]["type"] == "AverageValue"
    assert "toptagger_request_latency_seconds_sum" in metric["external"]["metric"]["query"]
    # The ServiceAccount that carries the S3 Secret exists in the same build.
    accounts = {d["metadata"]["name"]: d for d in built[overlay] if d["kind"] == "ServiceAccount"}
    assert predictor["serviceAccountName"] in accounts
    assert accounts[predictor["serviceAccountName"]]["secrets"] == [{"name": "top-tagger-s3"}]


def accelerators(isvc: dict[str, Any]) -> set[str]:
    return {name for name in kserve_container(isvc)["resources"]["limits"] if "/" in name}


def test_fpga_overlay_schedules_on_fpga_nodes(built: dict[str, list[dict[str, Any]]]) -> None:
    isvc = isvc_of(built["fpga"])
    predictor = isvc["spec"]["predictor"]
    assert predictor["nodeSelector"] == {"node.kubernetes.io/instance-type": "Standard_NP10s"}
    assert predictor["tolerations"] == [
        {"key": "fpga", "operator": "Equal", "value": "xilinx-u250", "effect": "NoSchedule"}
    ]
    assert accelerators(isvc) == {"amd.com/xilinx_u250_gen3x16_xdma_shell_4_1-0"}
    assert kserve_container(isvc)["resources"]["limits"]["amd.com/xilinx_u250_gen3x16_xdma_shell_4_1-0"] == "1"
    args = kserve_container(isvc)["args"]
    assert args[args.index("--backend") + 1] == "opencl"
    # an FPGA pod that cannot see its FPGA is not ready, rather than serving from PoCL's CPU device
    assert "--fallback" not in args
    env = {e["name"]: e.get("value") for e in kserve_container(isvc)["env"]}
    assert env["TOPTAGGER_OPENCL_DEVICE_TYPE"] == "ACCELERATOR"
    assert env["MODEL_URI"] == "/mnt/models", "the base's env is kept, the entry is appended"
    assert kserve_container(isvc)["image"].startswith("registry.example.com/top-tagger/predictor-fpga:")


def test_gpu_and_cpu_overlays(built: dict[str, list[dict[str, Any]]]) -> None:
    gpu, cpu = isvc_of(built["gpu"]), isvc_of(built["cpu"])
    assert accelerators(gpu) == {"nvidia.com/gpu"}
    assert accelerators(cpu) == set()
    assert "nodeSelector" not in cpu["spec"]["predictor"] and "tolerations" not in cpu["spec"]["predictor"]
    for isvc in (gpu, cpu):
        assert kserve_container(isvc)["image"].startswith("registry.example.com/top-tagger/predictor:")


def test_cluster_values_change_in_one_place(tmp_path: Path) -> None:
    """Editing only overlays/fpga/cluster-values.yaml moves the label, the taint and the resource name."""
    tree = tmp_path / "manifests"
    shutil.copytree(MANIFESTS, tree)
    values = tree / "overlays" / "fpga" / "cluster-values.yaml"
    text = values.read_text()
    replacements = {
        "node.kubernetes.io/instance-type: Standard_NP10s": "node.kubernetes.io/instance-type: f1.2xlarge",
        "value: xilinx-u250": "value: aws-f1",
        "amd.com~1xilinx_u250_gen3x16_xdma_shell_4_1-0": "xilinx.com~1fpga-xilinx_aws-vu9p-f1_dynamic_5_0-43981",
    }
    for old, new in replacements.items():
        assert text.count(old) == 1, f"{old!r} should appear exactly once in cluster-values.yaml"
        text = text.replace(old, new)
    values.write_text(text)
    isvc = isvc_of(build(tree / "overlays" / "fpga"))
    predictor = isvc["spec"]["predictor"]
    assert predictor["nodeSelector"] == {"node.kubernetes.io/instance-type": "f1.2xlarge"}
    assert predictor["tolerations"][0]["value"] == "aws-f1"
    assert accelerators(isvc) == {"xilinx.com/fpga-xilinx_aws-vu9p-f1_dynamic_5_0-43981"}


ROLES = {
    # the deploy step (toptagger/deploy/kserve.py)
    "top-tagger-deployer": [
        {
            "apiGroups": ["serving.kserve.io"],
            "resources": ["inferenceservices"],
            "verbs": ["create", "get", "list", "watch", "patch"],
        }
    ],
    # the TrainJob launcher (toptagger/deploy/trainjob/run.py): its jobs, their pods and logs
    "top-tagger-trainer": [
        {
            "apiGroups": ["trainer.kubeflow.org"],
            "resources": ["trainjobs"],
            "verbs": ["create", "get", "list", "watch", "delete"],
        },
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
    ],
}


def test_pipeline_roles_are_namespaced_minimal_and_bound_to_the_pipeline_runner(
    built: dict[str, list[dict[str, Any]]],
) -> None:
    docs = built["fpga"]
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    roles = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Role"}
    assert {name: role["rules"] for name, role in roles.items()} == ROLES
    bindings = {d["roleRef"]["name"]: d for d in docs if d["kind"] == "RoleBinding"}
    assert set(bindings) == set(ROLES)
    for name, binding in bindings.items():
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name}
        assert binding["metadata"]["namespace"] == roles[name]["metadata"]["namespace"]
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": "kubeflow"}]


# ---------------------------------------------------------------------------------------------
# Secure by default


SECRET_NAME = re.compile(r"(KEY|SECRET|PASSWORD|TOKEN|CREDENTIAL)", re.IGNORECASE)
AWS_ACCESS_KEY = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")


def test_no_secret_values_anywhere_in_manifests() -> None:
    docs = all_yaml_docs()
    assert docs
    for path, doc in docs:
        if doc.get("kind") == "Secret":
            assert not doc.get("data") and not doc.get("stringData"), f"{path}: a Secret with values"
        for spec in pod_specs(doc):
            for container in spec.get("containers", []) + spec.get("initContainers", []):
                for env in container.get("env", []):
                    if SECRET_NAME.search(env["name"]):
                        assert "value" not in env, f"{path}: {env['name']} must come from a Secret (valueFrom)"
    for path in MANIFESTS.rglob("*"):
        if path.is_file():
            assert not AWS_ACCESS_KEY.search(path.read_text(errors="replace")), f"{path}: looks like an AWS key"


def image_refs(docs: list[dict[str, Any]]) -> list[str]:
    specs = [s for d in docs for s in pod_specs(d)]
    return [c["image"] for s in specs for c in s.get("containers", []) + s.get("initContainers", [])]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_pinned(built: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    images = image_refs(built[overlay])
    assert images
    for image in images:
        name, _, tag = image.rpartition(":")
        assert "@sha256:" in image or (name and "/" not in tag and tag not in ("", "latest")), f"unpinned {image}"


def test_dockerfiles_pin_their_base_images() -> None:
    for name in ("components/Dockerfile", "serving/Dockerfile", "serving/Dockerfile.fpga"):
        path = REPO / name
        text = path.read_text()
        args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.MULTILINE))
        froms = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
        assert froms, f"{path}: no FROM"
        for written in froms:
            image = re.sub(r"\$\{?(\w+)\}?", lambda m, args=args: args.get(m.group(1), m.group(0)), written)
            assert "$" not in image, f"{path}: FROM {image} uses an ARG without a default"
            assert "@sha256:" in image or re.search(r":[\w.-]+$", image), f"{path}: FROM {image} has no tag"
            assert not image.endswith(":latest"), f"{path}: FROM {image}"
        users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
        assert users and re.fullmatch(r"\d+(:\d+)?", users[-1]) and not users[-1].startswith("0"), (
            f"{path}: the final USER must be a numeric non-root uid, got {users}"
        )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_containers_are_unprivileged_and_non_root(built: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    specs = [s for d in built[overlay] for s in pod_specs(d)]
    assert specs
    for spec in specs:
        pod = spec.get("securityContext", {})
        assert pod.get("runAsNonRoot") is True and pod.get("runAsUser", 0) != 0
        assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault"
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
        for container in spec.get("containers", []) + spec.get("initContainers", []):
            ctx = container.get("securityContext", {})
            assert ctx.get("privileged", False) is False, container["name"]
            assert ctx.get("allowPrivilegeEscalation") is False, container["name"]
            assert ctx.get("readOnlyRootFilesystem") is True, container["name"]
            assert ctx.get("capabilities", {}).get("drop") == ["ALL"], container["name"]
            assert not ctx.get("capabilities", {}).get("add"), container["name"]
            assert ctx.get("runAsNonRoot", True) is True and ctx.get("runAsUser", 1) != 0, container["name"]


def test_cpu_autoscaling_component_for_clusters_without_keda(
    tmp_path: Path, crd_schemas: dict[str, dict[str, Any]]
) -> None:
    """manifests/components/autoscale-cpu turns an overlay to HPA-on-CPU, still valid for the CRD."""
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(MANIFESTS / "overlays" / "fpga", tmp_path)],
        "components": [os.path.relpath(MANIFESTS / "components" / "autoscale-cpu", tmp_path)],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    isvc = isvc_of(build(tmp_path))
    predictor = isvc["spec"]["predictor"]
    assert isvc["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "hpa"
    assert (predictor["scaleMetric"], predictor["scaleTarget"]) == ("cpu", 70)
    assert "autoScaling" not in predictor
    assert predictor["nodeSelector"]  # the FPGA scheduling is untouched
    assert crd_errors(isvc, crd_schemas) == []


@pytest.mark.parametrize(
    ("overlay", "runtime"),
    [
        ("cpu", {"backend": "auto", "fallback": "torch", "precision": "auto"}),
        ("gpu", {"backend": "torch", "fallback": None, "precision": "fp16"}),
        ("fpga", {"backend": "opencl", "fallback": None, "precision": "fp32"}),
    ],
)
def test_each_pool_serves_with_its_runtime(
    built: dict[str, list[dict[str, Any]]], overlay: str, runtime: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the predictor's own parser makes of the overlay's env and args, as in the pod."""
    from serving.__main__ import build_parser

    container = kserve_container(isvc_of(built[overlay]))
    for name in ("BACKEND", "FALLBACK", "PRECISION"):
        monkeypatch.delenv(name, raising=False)
    for entry in container["env"]:
        monkeypatch.setenv(entry["name"], entry.get("value") or "")
    args = build_parser().parse_args(container.get("args", []))
    assert {"backend": args.backend, "fallback": args.fallback, "precision": args.precision} == runtime


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_model_control_is_off_and_its_token_comes_from_an_optional_secret(
    built: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    """serving/control.py: load/unload refused unless MODEL_CONTROL=explicit; the token only from a
    Secret that the cluster owner creates (optional: the pod starts without it)."""
    env = {entry["name"]: entry for entry in kserve_container(isvc_of(built[overlay]))["env"]}
    assert env["MODEL_CONTROL"]["value"] == "none"
    reference = env["CONTROL_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert reference == {"name": "top-tagger-control", "key": "token", "optional": True}
    assert not any(doc["kind"] == "Secret" and doc["metadata"]["name"] == reference["name"] for doc in built[overlay])
