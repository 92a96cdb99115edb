"""The manifests under deploy/: they parse, validate against the Kubernetes schemas of a pinned version
(and the custom resources against their CRDs' fields), the overlays build, and what they tell the
server (probes, port, settings, grace period, the autoscaler's metric) is what the server does."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.metrics import Metrics
from app.settings import Settings
from tests.deploy.kustomize import Doc, load_documents, merge, render, split_image
from tests.deploy.schemas import CUSTOM, MODEL_OWN, PREDICTOR_OWN, RUNTIME_POD, problems

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES, KSERVE = ROOT / "deploy" / "kubernetes", ROOT / "deploy" / "kserve"
K8S_VERSION = "1.37.0"  # the newest schemas kubernetes-validate 1.37.0 ships
OLDEST_K8S_VERSION = "1.30.0"  # the manifests use nothing newer
KUSTOMIZATIONS = ["base", "overlays/cpu", "overlays/gpu"]
PREFIX = "FUSIONSERVE_"
MARGIN_S = 10  # past the drain and the longest request: the lifespan's shutdown and the process's exit
STARTUP_S = 300  # load, warm-up and autotune before the startup probe gives up
UID = 10001  # the Dockerfile's user
WRITABLE = {"/tmp", "/home/fusionserve"}  # where the server writes: temporary files, torch's and Python's caches
PLACEHOLDERS = ("REPLACE", "CHANGE", "PLACEHOLDER", "<")


# --- the files ------------------------------------------------------------------------------------------


def yaml_files() -> list[Path]:
    return sorted([*KUBERNETES.rglob("*.yaml"), *KSERVE.rglob("*.yaml")])


def patch_files() -> set[Path]:
    """Files a kustomization names as patches: partial resources, checked once rendered."""
    return {
        (path.parent / patch["path"]).resolve()
        for path in KUBERNETES.rglob("kustomization.yaml")
        for patch in load_documents(path)[0].get("patches", [])
    }


def resources() -> list[tuple[str, Doc]]:
    """Every whole resource in the tree (no kustomizations, no patches), named by file, kind and name."""
    skip = patch_files()
    return [
        (f"{path.relative_to(ROOT)}:{doc['kind']}/{doc['metadata']['name']}", doc)
        for path in yaml_files()
        if path.name != "kustomization.yaml" and path.resolve() not in skip
        for doc in load_documents(path)
    ]


def rendered(folder: str) -> list[Doc]:
    return render(KUBERNETES / folder)


def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def kserve_docs() -> list[Doc]:
    return [doc for path in sorted(KSERVE.rglob("*.yaml")) for doc in load_documents(path)]


# --- validation: core resources against Kubernetes, custom ones against their CRDs' fields ----------------


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_document_parses_to_a_resource(path: Path) -> None:
    docs = load_documents(path)
    assert docs, f"{path} holds no document"
    for doc in docs:
        assert {"apiVersion", "kind"} <= set(doc), f"{path}: {sorted(doc)}"
        assert doc["kind"] == "Kustomization" or doc["metadata"]["name"], f"{path}: a resource has a name"


@pytest.mark.parametrize("version", [K8S_VERSION, OLDEST_K8S_VERSION])
def test_every_resource_validates(version: str) -> None:
    """Core resources against Kubernetes' schemas; ServiceMonitor, ScaledObject, InferenceService and
    ServingRuntime against their CRDs' fields, and the pod fields they inline against Kubernetes'."""
    docs = resources()
    assert {doc["kind"] for _, doc in docs} >= {"Deployment", "Service", "HorizontalPodAutoscaler", "Ingress", *CUSTOM}
    found = [problem for _, doc in docs for problem in problems(doc, version)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("folder", KUSTOMIZATIONS)
@pytest.mark.parametrize("version", [K8S_VERSION, OLDEST_K8S_VERSION])
def test_kustomizations_render_to_valid_resources(folder: str, version: str) -> None:
    docs = rendered(folder)
    kinds = {doc["kind"] for doc in docs}
    assert kinds >= {"Namespace", "ConfigMap", "PersistentVolumeClaim", "Deployment", "Service"}, kinds
    assert kinds >= {"PodDisruptionBudget", "HorizontalPodAutoscaler", "NetworkPolicy"}, kinds
    names = [(doc["kind"], doc["metadata"]["name"]) for doc in docs]
    assert len(names) == len(set(names)), names
    found = [problem for doc in docs for problem in problems(doc, version)]
    assert not found, "\n".join(found)
    for doc in docs:
        assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == "fusionserve", doc["metadata"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed: the renderer alone builds")
@pytest.mark.parametrize("folder", KUSTOMIZATIONS)
def test_the_renderer_agrees_with_kubectl_kustomize(folder: str) -> None:
    out = subprocess.run(["kubectl", "kustomize", str(KUBERNETES / folder)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    theirs = [doc for doc in yaml.safe_load_all(out.stdout) if doc]

    def key(doc: Doc) -> tuple[str, str]:
        return doc["kind"], doc["metadata"]["name"]

    assert sorted(rendered(folder), key=key) == sorted(theirs, key=key)


@pytest.mark.parametrize(
    ("path", "old", "new", "problem"),
    [
        ("kubernetes/base/deployment.yaml", "imagePullPolicy: IfNotPresent", "imagePull: IfNotPresent", "imagePull"),
        ("kserve/inferenceservice.yaml", "protocolVersion: v2", "protocolVersion: v3", "'v3' is not one of"),
        ("kserve/inferenceservice.yaml", "    minReplicas: 2", "    protocolVersion: v2", "'protocolVersion' was"),
        ("kserve/servingruntime.yaml", "readOnlyRootFilesystem: true", "readOnlyRoot: true", "'readOnlyRoot' was"),
        ("kubernetes/monitoring/servicemonitor.yaml", "interval: 15s", "interval: 15 s", "'15 s' does not match"),
        ("kubernetes/monitoring/keda-scaledobject.yaml", "stabilizationWindowSeconds", "window", "'window' was"),
    ],
)
def test_validation_catches_a_wrong_field(path: str, old: str, new: str, problem: str) -> None:
    """The checks above can fail: one wrong field in a real manifest is reported, by name."""
    text = (ROOT / "deploy" / path).read_text()
    assert old in text, f"{path} no longer holds {old!r}"
    found = [p for doc in yaml.safe_load_all(text.replace(old, new, 1)) for p in problems(doc, K8S_VERSION)]
    assert any(problem in p for p in found), found


# --- what the pods tell the server ----------------------------------------------------------------------


@dataclass
class PodView:
    """One deployable pod: its spec, the server's container, and the FUSIONSERVE_* settings it gets."""

    name: str
    spec: dict[str, Any]
    container: dict[str, Any]
    settings: dict[str, str] = field(default_factory=dict)  # literal values, by variable
    secrets: dict[str, Any] = field(default_factory=dict)  # variables from a Secret: their secretKeyRef

    @property
    def port(self) -> int:
        return int(self.settings.get(f"{PREFIX}PORT", Settings.model_fields["port"].default))


def env_settings(container: dict[str, Any], config_maps: dict[str, dict[str, str]]) -> tuple[dict, dict]:
    values: dict[str, str] = {}
    for source in container.get("envFrom", []):
        values |= config_maps[source["configMapRef"]["name"]]
    values |= {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container.get("env", []) if "valueFrom" in e}
    return values, secrets


def kubernetes_pods() -> Iterator[PodView]:
    for folder in KUSTOMIZATIONS:
        docs = rendered(folder)
        config_maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
        spec = one(docs, "Deployment")["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        yield PodView(folder, spec, container, *env_settings(container, config_maps))


def kserve_pods() -> Iterator[PodView]:
    runtimes = {d["metadata"]["name"]: d["spec"] for d in kserve_docs() if d["kind"] == "ServingRuntime"}
    isvcs = [(path, doc) for path in sorted(KSERVE.rglob("*.yaml")) for doc in load_documents(path)]
    for path, isvc in [(path, doc) for path, doc in isvcs if doc["kind"] == "InferenceService"]:
        predictor = isvc["spec"]["predictor"]
        pod = {k: v for k, v in predictor.items() if k not in PREDICTOR_OWN}
        if "model" in predictor:  # KServe lays the model's container fields over its runtime's container
            runtime = runtimes[predictor["model"]["runtime"]]
            (base,) = runtime["containers"]
            model = {k: v for k, v in predictor["model"].items() if k not in MODEL_OWN}
            pod = {**{k: v for k, v in runtime.items() if k in RUNTIME_POD}, **pod, "containers": [merge(base, model)]}
        (container,) = pod["containers"]
        yield PodView(str(path.relative_to(ROOT)), pod, container, *env_settings(container, {}))


def all_pods() -> list[PodView]:
    pods = [*kubernetes_pods(), *kserve_pods()]
    assert len(pods) == len(KUSTOMIZATIONS) + 2, [p.name for p in pods]
    return pods


def settings_of(pod: PodView, tmp_path: Path) -> Settings:
    """The server's settings for the pod's variables (the checkpoint folder is the pod's: stand one in)."""
    values = {k[len(PREFIX) :].lower(): v for k, v in pod.settings.items() if k.startswith(PREFIX)}
    if "checkpoint" in values:
        values["checkpoint"] = str(tmp_path)
    return Settings(**values)


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The settings come from the manifests alone, never from this process's environment."""
    for name in [n for n in os.environ if n.startswith(PREFIX)]:
        monkeypatch.delenv(name)


def test_probes_use_the_servers_health_routes_on_its_port(no_env: None) -> None:
    from app.main import create_app

    paths = set(create_app(Settings()).openapi()["paths"])  # every HTTP route the server has
    assert "/metrics" in paths, "the scrape annotations and the ServiceMonitor read /metrics"
    for pod in all_pods():
        container = pod.container
        ports = {p.get("name"): p["containerPort"] for p in container["ports"]}
        assert list(ports.values()) == [pod.port], (pod.name, ports, pod.port)
        wanted = {"startupProbe": "/v2/health/live", "livenessProbe": "/v2/health/live"}
        wanted["readinessProbe"] = "/v2/health/ready"
        for probe, path in wanted.items():
            get = container[probe]["httpGet"]
            assert get["path"] == path and path in paths, (pod.name, probe, get)
            assert ports.get(get["port"], get["port"]) == pod.port, (pod.name, probe, get)
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= STARTUP_S, (pod.name, startup)


def test_the_kubernetes_port_is_the_servers_default() -> None:
    """The Dockerfile, the docs and the Service all say 8000: the ConfigMap keeps the server's default."""
    for pod in kubernetes_pods():
        assert pod.port == Settings.model_fields["port"].default == 8000, pod.name


def test_every_variable_is_a_setting_and_the_values_validate(no_env: None, tmp_path: Path) -> None:
    for pod in all_pods():
        names = [n for n in [*pod.settings, *pod.secrets] if n.startswith(PREFIX)]
        unknown = [n for n in names if n[len(PREFIX) :].lower() not in Settings.model_fields]
        assert not unknown, (pod.name, unknown)
        settings = settings_of(pod, tmp_path)
        assert settings.host == "0.0.0.0", pod.name


def test_the_grace_period_covers_the_drain_and_the_longest_request(no_env: None, tmp_path: Path) -> None:
    for pod in all_pods():
        settings = settings_of(pod, tmp_path)
        grace = pod.spec["terminationGracePeriodSeconds"]
        needed = settings.drain_s + settings.longest_request_s + MARGIN_S
        assert grace >= needed, f"{pod.name}: {grace} s < DRAIN_S + longest request + margin = {needed} s"
        assert "lifecycle" not in pod.container, f"{pod.name}: the server drains itself; no preStop hook"
        ready = pod.container["readinessProbe"]
        # the drain outlasts a load balancer that only follows the readiness probe
        assert settings.drain_s >= ready["periodSeconds"] * ready["failureThreshold"], pod.name


def storage_uri(container: dict[str, Any]) -> str:
    """A custom predictor's checkpoints: KServe reads them from its STORAGE_URI variable."""
    return env_settings(container, {})[0]["STORAGE_URI"]


def test_checkpoints_come_from_a_read_only_volume() -> None:
    for pod in kubernetes_pods():
        path = pod.settings[f"{PREFIX}CHECKPOINT"]
        (mount,) = [m for m in pod.container["volumeMounts"] if m["mountPath"] == path]
        (volume,) = [v for v in pod.spec["volumes"] if v["name"] == mount["name"]]
        assert mount.get("readOnly") and volume["persistentVolumeClaim"]["readOnly"], pod.name
        claims = [d["metadata"]["name"] for d in rendered(pod.name) if d["kind"] == "PersistentVolumeClaim"]
        assert volume["persistentVolumeClaim"]["claimName"] in claims, pod.name
    for pod in kserve_pods():  # KServe mounts the storageUri at /mnt/models
        assert pod.settings[f"{PREFIX}CHECKPOINT"] == "/mnt/models", pod.name
    predictors = [d["spec"]["predictor"] for d in kserve_docs() if d["kind"] == "InferenceService"]
    uris = [p["model"]["storageUri"] if "model" in p else storage_uri(p["containers"][0]) for p in predictors]
    assert all(uri.startswith("pvc://fusionserve-checkpoints/") for uri in uris), uris


def test_pods_run_restricted() -> None:
    for pod in all_pods():
        spec, container = pod.spec, pod.container
        security = {**spec.get("securityContext", {}), **container["securityContext"]}
        assert security["runAsNonRoot"] is True and security["runAsUser"] == security["runAsGroup"] == UID, pod.name
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}, pod.name
        assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True, pod.name
        assert security["capabilities"] == {"drop": ["ALL"]}, pod.name
        assert not security.get("privileged") and not spec.get("hostNetwork") and not spec.get("hostPID"), pod.name
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert not any("hostPath" in v for v in volumes.values()), pod.name
        scratch = {m["mountPath"] for m in container["volumeMounts"] if "emptyDir" in volumes[m["name"]]}
        assert scratch == WRITABLE, (pod.name, scratch)
        assert spec.get("automountServiceAccountToken") is False, pod.name
    namespace = one(rendered("base"), "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_the_api_key_comes_from_a_secret_and_no_secret_is_committed() -> None:
    for pod in all_pods():
        assert f"{PREFIX}API_KEY" not in pod.settings, pod.name
        ref = pod.secrets[f"{PREFIX}API_KEY"]
        assert (ref["name"], ref["key"]) == ("fusionserve-api-key", "api-key"), pod.name
    for name, doc in resources():
        if doc["kind"] == "Secret":
            values = [*doc.get("data", {}).values(), *doc.get("stringData", {}).values()]
            real = [v for v in values if not any(mark in str(v).upper() for mark in PLACEHOLDERS)]
            assert not real, f"{name} holds a value that is not a placeholder"


# --- the pieces around the Deployment -------------------------------------------------------------------


def test_service_budget_policy_and_autoscaler_select_the_deployment() -> None:
    docs = rendered("base")
    deployment = one(docs, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    (port,) = container["ports"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    service, policy = one(docs, "Service"), one(docs, "NetworkPolicy")
    assert service["spec"]["selector"].items() <= labels.items()
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [port["name"]]
    assert one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert one(docs, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert [p["port"] for p in rule["ports"]] == [port["containerPort"]]
    sources = [set(peer) for peer in rule["from"]]
    assert sources and all(s == {"namespaceSelector"} for s in sources), "only namespaces, by name"
    assert all(peer["namespaceSelector"]["matchLabels"] for peer in rule["from"]), "an empty selector admits all"
    scrape = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(scrape["prometheus.io/port"]) == port["containerPort"] and scrape["prometheus.io/path"] == "/metrics"
    (monitor,) = [d for _, d in resources() if d["kind"] == "ServiceMonitor"]
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [p["name"] for p in service["spec"]["ports"]]


def test_the_autoscalers_scale_on_a_metric_the_server_exports() -> None:
    exported = {metric.name for metric in Metrics().registry.collect()}
    hpas = [one(rendered("base"), "HorizontalPodAutoscaler"), one(kserve_docs(), "HorizontalPodAutoscaler")]
    targets = set()
    for hpa in hpas:
        (metric,) = hpa["spec"]["metrics"]
        assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
        targets.add((metric["pods"]["metric"]["name"], metric["pods"]["target"]["averageValue"]))
    ((name, average),) = targets
    assert name in exported, f"{name} is not among {sorted(exported)}"
    adapter = one([d for _, d in resources()], "ConfigMap", "prometheus-adapter")
    (rule,) = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    assert rule["seriesQuery"].startswith(name + "{") and rule["name"]["as"] == name
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}, "a per-pod metric"
    (keda,) = [d for _, d in resources() if d["kind"] == "ScaledObject"]
    (trigger,) = keda["spec"]["triggers"]
    assert f"sum({name}{{" in trigger["metadata"]["query"] and trigger["metadata"]["threshold"] == average
    base, spec = hpas[0]["spec"], keda["spec"]
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (base["minReplicas"], base["maxReplicas"])
    assert spec["scaleTargetRef"]["name"] == base["scaleTargetRef"]["name"]
    isvcs = {d["metadata"]["name"] for d in kserve_docs() if d["kind"] == "InferenceService"}
    predictors = [f"{isvc}-predictor" for isvc in isvcs]  # the Deployment KServe makes
    assert predictors == [hpas[1]["spec"]["scaleTargetRef"]["name"]], predictors


def megabytes(quantity: str) -> float:
    """An ingress-nginx size (``256m``, ``1g``, ``512k``) in MiB."""
    scale = {"k": 1 / 1024, "m": 1, "g": 1024}
    return float(quantity[:-1]) * scale[quantity[-1].lower()] if quantity[-1].isalpha() else float(quantity) / 2**20


def test_the_ingress_lets_through_what_the_server_takes(no_env: None, tmp_path: Path) -> None:
    (pod,) = [p for p in kubernetes_pods() if p.name == "base"]
    settings = settings_of(pod, tmp_path)
    ingress = one([d for _, d in resources()], "Ingress")
    service = one(rendered("base"), "Service")
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    backend = path["backend"]["service"]
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"]["number"] in [p["port"] for p in service["spec"]["ports"]]
    nginx = ingress["metadata"]["annotations"]
    largest = max(settings.max_upload_mb, settings.max_json_mb, settings.max_video_mb)
    assert megabytes(nginx["nginx.ingress.kubernetes.io/proxy-body-size"]) >= largest
    assert int(nginx["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= settings.longest_request_s


# --- the overlays ----------------------------------------------------------------------------------------


def cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def test_cpu_pods_give_torch_their_cpu_request() -> None:
    for pod in kubernetes_pods():
        if pod.settings.get(f"{PREFIX}DEVICE") == "cuda":
            continue
        request = cpus(pod.container["resources"]["requests"]["cpu"])
        assert int(pod.settings[f"{PREFIX}TORCH_THREADS"]) == request, pod.name
        assert pod.container["resources"]["limits"]["memory"], pod.name


def test_the_gpu_overlay_asks_for_one_gpu_and_sizes_decoding_to_its_cpus() -> None:
    (pod,) = [p for p in kubernetes_pods() if p.name == "overlays/gpu"]
    asked = pod.container["resources"]
    assert asked["limits"]["nvidia.com/gpu"] == "1" == asked["requests"]["nvidia.com/gpu"]
    assert pod.container["image"].endswith("-cuda"), pod.container["image"]
    assert pod.settings[f"{PREFIX}DEVICE"] == "cuda"
    request = cpus(asked["requests"]["cpu"])
    assert int(pod.settings[f"{PREFIX}DECODE_PROCESSES"]) == request // 2
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod.spec["tolerations"])
    assert pod.spec["nodeSelector"]
    (cpu,) = [p for p in kubernetes_pods() if p.name == "overlays/cpu"]
    assert "nvidia.com/gpu" not in cpu.container["resources"]["limits"] and not cpu.container["image"].endswith("-cuda")


# --- the renderer itself (where no kubectl checks it) -----------------------------------------------------


def test_strategic_merge_merges_keyed_lists_and_replaces_the_rest() -> None:
    base = {
        "containers": [{"name": "a", "image": "x", "env": [{"name": "K", "value": "1"}, {"name": "L", "value": "2"}]}],
        "tolerations": [{"key": "t1"}],
        "nodeSelector": {"zone": "a", "old": "x"},
    }
    patch = {
        "containers": [{"name": "a", "env": [{"name": "L", "value": "3"}]}, {"name": "b", "image": "y"}],
        "tolerations": [{"key": "t2"}],
        "nodeSelector": {"old": None, "gpu": "true"},
    }
    assert merge(base, patch) == {
        "containers": [
            {"name": "a", "image": "x", "env": [{"name": "K", "value": "1"}, {"name": "L", "value": "3"}]},
            {"name": "b", "image": "y"},
        ],
        "tolerations": [{"key": "t2"}],
        "nodeSelector": {"zone": "a", "gpu": "true"},
    }


@pytest.mark.parametrize(
    ("image", "parts"),
    [
        ("fusionserve", ("fusionserve", "")),
        ("fusionserve:0.1.0", ("fusionserve", ":0.1.0")),
        ("registry:5000/team/fusionserve:cuda", ("registry:5000/team/fusionserve", ":cuda")),
        ("registry:5000/fusionserve", ("registry:5000/fusionserve", "")),
        ("fusionserve@sha256:abc", ("fusionserve", "@sha256:abc")),
    ],
)
def test_image_names_split_from_their_tag_or_digest(image: str, parts: tuple[str, str]) -> None:
    assert split_image(image) == parts
