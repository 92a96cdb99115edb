"""What is wrong with a manifest: core resources checked against the Kubernetes schemas of a version
(kubernetes-validate, strict: an unknown field is an error), custom resources against schemas written
here from their CRDs, and the core fields they inline (a pod spec, a container, an HPA's behavior)
against Kubernetes' schemas again.

The CRD schemas hold the fields these manifests use and those beside them, with the CRDs' types, enums
and required fields; any other field fails, so a new one is checked against its CRD before it lands.
"""

from __future__ import annotations

from typing import Any

import jsonschema
import kubernetes_validate

Doc = dict[str, Any]
Schema = dict[str, Any]

INT, STR, BOOL = {"type": "integer"}, {"type": "string"}, {"type": "boolean"}
NAME = {"type": "string", "pattern": "^[a-z]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}
STRINGS = {"type": "object", "additionalProperties": STR}
SELECTOR = {"type": "object", "properties": {"matchLabels": STRINGS}, "additionalProperties": False}
DURATION = {"type": "string", "pattern": "^(0|([0-9]+h)?([0-9]+m)?([0-9]+s)?([0-9]+ms)?)$"}  # Prometheus's
PROTOCOLS = {"enum": ["v1", "v2", "grpc-v1", "grpc-v2"]}


def obj(required: list[str], **properties: Any) -> Schema:
    return {"type": "object", "required": required, "properties": properties, "additionalProperties": False}


def crd(api_version: str, kind: str, spec: Schema) -> Schema:
    """A custom resource: its group/version and kind, metadata as Kubernetes has it, and its spec."""
    metadata = obj(["name"], name=NAME, namespace=NAME, labels=STRINGS, annotations=STRINGS)
    kinds = {"apiVersion": {"const": api_version}, "kind": {"const": kind}}
    return obj(["apiVersion", "kind", "metadata", "spec"], **kinds, metadata=metadata, spec=spec)


SERVICE_MONITOR = crd(  # Prometheus Operator
    "monitoring.coreos.com/v1",
    "ServiceMonitor",
    obj(
        ["selector"],
        selector=SELECTOR,
        jobLabel=STR,
        namespaceSelector=obj([], any=BOOL, matchNames={"type": "array", "items": STR}),
        endpoints={
            "type": "array",
            "items": obj(
                [],
                port=STR,
                path=STR,
                scheme={"enum": ["http", "https"]},
                interval=DURATION,
                scrapeTimeout=DURATION,
                honorLabels=BOOL,
            ),
        },
    ),
)
SCALED_OBJECT = crd(  # KEDA
    "keda.sh/v1alpha1",
    "ScaledObject",
    obj(
        ["scaleTargetRef", "triggers"],
        scaleTargetRef=obj(["name"], apiVersion=STR, kind=STR, name=STR),
        minReplicaCount=INT,
        maxReplicaCount=INT,
        pollingInterval=INT,
        cooldownPeriod=INT,
        advanced=obj([], horizontalPodAutoscalerConfig=obj([], name=STR, behavior={"type": "object"})),
        triggers={
            "type": "array",
            "minItems": 1,
            "items": obj(
                ["type", "metadata"],
                type=STR,
                name=STR,
                metricType={"enum": ["AverageValue", "Value", "Utilization"]},
                metadata=STRINGS,
            ),
        },
    ),
)
# KServe's ModelSpec beside the container fields it inlines, and PredictorSpec's ComponentExtensionSpec
# beside the pod spec it inlines
MODEL_OWN = {
    "modelFormat": obj(["name"], name=STR, version=STR),
    "runtime": STR,
    "protocolVersion": PROTOCOLS,
    "storageUri": STR,
    "runtimeVersion": STR,
}
PREDICTOR_OWN = {
    "minReplicas": {"type": "integer", "minimum": 0},
    "maxReplicas": {"type": "integer", "minimum": 0},
    "scaleTarget": INT,
    "scaleMetric": {"enum": ["cpu", "memory", "concurrency", "rps"]},
    "containerConcurrency": INT,
    "timeout": INT,
    "labels": STRINGS,
    "annotations": STRINGS,
    "model": {"type": "object", "required": ["modelFormat"], "properties": MODEL_OWN},
}
INFERENCE_SERVICE = crd("serving.kserve.io/v1beta1", "InferenceService", obj(["predictor"], predictor={}))
# ServingRuntimePodSpec: a subset of the core PodSpec
RUNTIME_POD = {"containers", "volumes", "nodeSelector", "affinity", "tolerations", "imagePullSecrets", "hostIPC"}
SERVING_RUNTIME = crd(
    "serving.kserve.io/v1alpha1",
    "ServingRuntime",
    obj(
        ["containers"],
        supportedModelFormats={
            "type": "array",
            "items": obj(["name"], name=STR, version=STR, autoSelect=BOOL, priority={"type": "integer", "minimum": 1}),
        },
        protocolVersions={"type": "array", "items": PROTOCOLS},
        multiModel=BOOL,
        disabled=BOOL,
        labels=STRINGS,
        annotations=STRINGS,
        **{key: {} for key in RUNTIME_POD},  # checked as a Pod's
    ),
)
KSERVE_ANNOTATIONS = {  # the values KServe accepts for the annotations used here
    "serving.kserve.io/deploymentMode": {"Standard", "Knative", "RawDeployment", "Serverless"},
    "serving.kserve.io/autoscalerClass": {"hpa", "keda", "external", "none"},
}
CUSTOM = {
    "ServiceMonitor": SERVICE_MONITOR,
    "ScaledObject": SCALED_OBJECT,
    "InferenceService": INFERENCE_SERVICE,
    "ServingRuntime": SERVING_RUNTIME,
}


def core_problem(doc: Doc, version: str) -> str | None:
    """kubernetes-validate's finding, in one line (its exception's text holds the whole schema)."""
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return f"{doc['kind']}/{doc['metadata']['name']} ({version}): {exc.message} at {list(exc.absolute_path)}"
    return None


def schema_problem(instance: Any, schema: Schema, name: str) -> str | None:
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(instance))
    return None if error is None else f"{name}: {error.message} at {list(error.absolute_path)}"


def as_pod(owner: Doc, spec: Doc, version: str) -> str | None:
    """Pod fields a custom resource inlines, validated as a Pod's (named for their owner)."""
    name = f"{owner['kind'].lower()}-{owner['metadata']['name']}"
    return core_problem({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}, version)


def inlined_problems(doc: Doc, version: str) -> list[str | None]:
    """The core fields each custom resource inlines, against Kubernetes' schemas."""
    spec = doc["spec"]
    if doc["kind"] == "ServingRuntime":
        return [as_pod(doc, {k: v for k, v in spec.items() if k in RUNTIME_POD}, version)]
    if doc["kind"] == "InferenceService":
        predictor = spec["predictor"]
        own = {k: v for k, v in predictor.items() if k in PREDICTOR_OWN}
        pod = {k: v for k, v in predictor.items() if k not in PREDICTOR_OWN}
        model = {k: v for k, v in predictor.get("model", {}).items() if k not in MODEL_OWN}
        shape = None if ("containers" in pod) != ("model" in predictor) else "a model or a custom container"
        return [
            schema_problem(own, {"properties": PREDICTOR_OWN}, "predictor"),
            as_pod(doc, {"containers": [{"name": "kserve-container", **model}], **pod}, version),
            shape,
        ]
    if doc["kind"] == "ScaledObject":  # KEDA hands its behavior to the HPA it makes
        behavior = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior", {})
        target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": spec["scaleTargetRef"]["name"]}
        hpa = {"scaleTargetRef": target, "maxReplicas": spec.get("maxReplicaCount", 100), "behavior": behavior}
        meta = {"name": doc["metadata"]["name"]}
        made = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": meta, "spec": hpa}
        return [core_problem(made, version)]
    return []


def problems(doc: Doc, version: str) -> list[str]:
    """Everything wrong with one resource, core or custom; empty when it is valid."""
    if doc["kind"] not in CUSTOM:
        found = [core_problem(doc, version)]
    else:
        found = [schema_problem(doc, CUSTOM[doc["kind"]], f"{doc['kind']}/{doc['metadata']['name']}")]
        found += inlined_problems(doc, version) if found == [None] else []
        annotations = doc["metadata"].get("annotations", {})
        found += [
            f"{key}: {annotations[key]!r} is not one of {sorted(allowed)}"
            for key, allowed in KSERVE_ANNOTATIONS.items()
            if key in annotations and annotations[key] not in allowed
        ]
    return [problem for problem in found if problem]
