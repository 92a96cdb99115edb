"""A small kustomize: renders the kustomizations under deploy/kubernetes as ``kubectl kustomize`` does,
for the fields they use (resources, namespace, images, strategic-merge patches from files), so the suite
builds the overlays without a kustomize binary. A kustomization with any other field is refused, so
the renderer and the manifests cannot drift apart silently."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

Doc = dict[str, Any]

SUPPORTED = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding"}
# the strategic-merge keys of the lists the patches touch (Kubernetes' x-kubernetes-patch-merge-key);
# any other list is replaced whole, as strategic merge does for lists without one (tolerations)
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
}


def load_documents(path: Path) -> list[Doc]:
    """Every non-empty YAML document of ``path``; each must be a mapping."""
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is a {type(doc).__name__}, not a mapping"
    return docs


def render(folder: Path) -> list[Doc]:
    """The resources the kustomization in ``folder`` builds, in the order kustomize emits them before sorting."""
    kustomization = load_documents(folder / "kustomization.yaml")[0]
    unknown = set(kustomization) - SUPPORTED
    assert not unknown, f"{folder}: kustomization fields this renderer does not apply: {sorted(unknown)}"
    docs: list[Doc] = []
    for entry in kustomization.get("resources", []):
        path = folder / entry
        docs += render(path) if path.is_dir() else load_documents(path)
    for patch in kustomization.get("patches", []):
        assert set(patch) == {"path"}, f"{folder}: only patches from files (path:) are supported, got {patch}"
        for change in load_documents(folder / patch["path"]):
            target = find(docs, change)
            docs[docs.index(target)] = merge(target, change)
    for image in kustomization.get("images", []):
        docs = [set_image(doc, image) for doc in docs]
    if "namespace" in kustomization:
        docs = [set_namespace(doc, kustomization["namespace"]) for doc in docs]
    return docs


def find(docs: list[Doc], patch: Doc) -> Doc:
    """The one resource a patch names, by apiVersion, kind and name."""
    key = (patch["apiVersion"], patch["kind"], patch["metadata"]["name"])
    matches = [doc for doc in docs if (doc["apiVersion"], doc["kind"], doc["metadata"]["name"]) == key]
    assert len(matches) == 1, f"a patch must match one resource, {key} matches {len(matches)}"
    return matches[0]


def merge(base: Any, patch: Any, field: str = "") -> Any:
    """Strategic merge: mappings merge key by key (null deletes), keyed lists merge item by item."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = merge(base[key], value, key) if key in base else copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list) and field in MERGE_KEYS:
        key = MERGE_KEYS[field]
        out = copy.deepcopy(base)
        for item in patch:
            index = next((i for i, old in enumerate(out) if old.get(key) == item[key]), None)
            if index is None:
                out.append(copy.deepcopy(item))
            else:
                out[index] = merge(out[index], item)
        return out
    return copy.deepcopy(patch)


def split_image(image: str) -> tuple[str, str]:
    """``registry:5000/name:tag`` -> (``registry:5000/name``, ``:tag``); a digest stays in the second part."""
    if "@" in image:
        name, digest = image.split("@", 1)
        return name, "@" + digest
    name, sep, tag = image.rpartition(":")
    if not sep or "/" in tag:
        return image, ""
    return name, ":" + tag


def set_image(node: Any, image: dict[str, str]) -> Any:
    """kustomize's images: every container image named ``image["name"]`` gets newName and newTag."""
    if isinstance(node, list):
        return [set_image(item, image) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: set_image(value, image) for key, value in node.items()}
    for field in ("containers", "initContainers"):
        for container in out.get(field) or []:
            name, tag = split_image(container.get("image", ""))
            if name == image["name"]:
                tag = ":" + image["newTag"] if "newTag" in image else tag
                container["image"] = image.get("newName", name) + tag
    return out


def set_namespace(doc: Doc, namespace: str) -> Doc:
    if doc["kind"] in CLUSTER_SCOPED:
        return doc
    out = copy.deepcopy(doc)
    out["metadata"]["namespace"] = namespace
    return out
