"""Shared by the deployment tests (a plain module: `conftest` is a name several test folders use)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "splitserve"
GPU_SPOT_VALUES = CHART / "ci" / "gpu-spot-values.yaml"
CRD = REPO / "deploy" / "kuberay" / "ray.io_rayclusters.yaml"
TOOLS_DIR = Path.home() / ".cache" / "splitserve-ci"   # where .ci/install_helm.sh puts node_modules
IN_CI = os.environ.get("CI", "").lower() == "true"


def missing_tool(what: str) -> None:
    message = f"{what} is missing: run `bash .ci/install_helm.sh`"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


class Helm:
    """`helm template` / `helm lint` on the chart, with values files and --set overrides."""

    def __init__(self, binary: str):
        self.binary = binary

    def run(self, verb: str, values: list[Path] = (), sets: list[str] = ()) -> subprocess.CompletedProcess:
        cmd = [self.binary, verb]
        if verb == "template":
            cmd += ["rel", str(CHART), "--namespace", "llm"]
        else:
            cmd += [str(CHART), "--strict"]
        for v in values:
            cmd += ["--values", str(v)]
        for s in sets:
            cmd += ["--set", s]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    def render(self, values: list[Path] = (), sets: list[str] = ()) -> list[dict]:
        out = self.run("template", values, sets)
        assert out.returncode == 0, out.stderr
        return [d for d in yaml.safe_load_all(out.stdout) if d]

    def refuse(self, sets: list[str], values: list[Path] = ()) -> str:
        """Render bad values; return helm's error message, failing the test if helm accepted them."""
        out = self.run("template", values, sets)
        assert out.returncode != 0, f"helm accepted bad values {sets}"
        return out.stderr


def only(docs: list[dict], kind: str, name_suffix: str = "") -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind} *{name_suffix}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


# The chart's kubeVersion floor and the newest Kubernetes whose schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.27", "1.37")


def k8s_definitions(version: str) -> dict:
    from kubernetes_validate import utils

    full = [v for v in utils.all_versions() if utils.major_minor(v) == version][-1]
    return utils.schema_contents(f"kubernetes-json-schema/v{full}-local-strict/_definitions.json", version)


def crd_validator(crd: dict, k8s_version: str):
    """A validator for the CRD's openAPIV3Schema, made strict the way `kubectl apply` (field validation Strict)
    is: unknown fields are errors, not silently pruned. Embedded Kubernetes types, which the CRD leaves open and
    names in their description, are checked against the Kubernetes schema of that version."""
    import jsonschema
    from referencing import Registry, Resource

    defs = k8s_definitions(k8s_version)

    def strict(node):
        if isinstance(node, list):
            return [strict(v) for v in node]
        if not isinstance(node, dict):
            return node
        described = node.get("description")
        if isinstance(described, str) and described.startswith("Kubernetes io.k8s."):
            return {"$ref": f"{defs['$id']}#/$defs/{described.split()[1]}"}
        out = {k: strict(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
        if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out

    (version,) = crd["spec"]["versions"]
    schema = strict(version["schema"]["openAPIV3Schema"])
    registry = Registry().with_resource(defs["$id"], Resource.from_contents(defs))
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validate_service_monitor(doc: dict, tools_dir: Path) -> None:
    """Checks a ServiceMonitor with the validators @kubernetes-models generated from prometheus-operator's CRD."""
    import json

    script = """
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
import { readFileSync } from "node:fs";
try { new ServiceMonitor(JSON.parse(readFileSync(0, "utf8"))).validate(); }
catch (e) { console.error(e.message); process.exit(1); }
"""
    out = subprocess.run(["node", "--input-type=module", "-e", script], input=json.dumps(doc), cwd=tools_dir,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"ServiceMonitor {doc['metadata']['name']}: {out.stderr}"
