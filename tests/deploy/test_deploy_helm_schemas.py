"""The chart renders, and everything it renders is accepted by the schemas a cluster would apply."""

from __future__ import annotations

import copy

import jsonschema
import kubernetes_validate
import pytest

from deploy_helpers import GPU_SPOT_VALUES, K8S_VERSIONS, crd_validator, only, validate_service_monitor

CUSTOM_KINDS = {"RayCluster", "ServiceMonitor"}


@pytest.mark.parametrize("values", [[], [GPU_SPOT_VALUES]], ids=["default", "gpu-spot"])
def test_helm_lint_passes(chart, values):
    out = chart.run("lint", values)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 chart(s) failed" in out.stdout


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
def test_builtin_kinds_pass_kubernetes_schemas(default_docs, gpu_docs, k8s_version):
    docs = [d for d in default_docs + gpu_docs if d["kind"] not in CUSTOM_KINDS]
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "StatefulSet", "PodDisruptionBudget"} <= kinds
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, k8s_version, strict=True)  # strict: unknown fields are errors
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} on Kubernetes {k8s_version}: {e.message} "
                        f"at {list(e.absolute_path)}")


def test_rendered_kinds(default_docs, gpu_docs):
    """Internal Redis only when no external one is given; the ServiceMonitor only when asked for."""
    def kinds(docs):
        return sorted(d["kind"] for d in docs)

    common = ["Deployment", "PodDisruptionBudget", "PodDisruptionBudget", "PodDisruptionBudget", "RayCluster"]
    assert kinds(default_docs) == sorted(common + ["Service", "Service", "Service", "StatefulSet"])
    assert kinds(gpu_docs) == sorted(common + ["Service", "ServiceMonitor"])


def test_checked_in_crd_is_a_valid_crd(crd):
    kubernetes_validate.validate(crd, K8S_VERSIONS[-1], strict=True)
    assert crd["spec"]["group"] == "ray.io" and crd["spec"]["names"]["kind"] == "RayCluster"


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
def test_raycluster_passes_kuberay_crd_schema(crd, default_docs, gpu_docs, k8s_version):
    validator = crd_validator(crd, k8s_version)
    for docs in (default_docs, gpu_docs):
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(only(docs, "RayCluster"))]
        assert not errors, errors


@pytest.mark.parametrize("break_it, where", [
    (lambda rc: rc["spec"]["workerGroupSpecs"][0].update(minReplica=1), "minReplica"),
    (lambda rc: rc["spec"]["workerGroupSpecs"][1]["rayStartParams"].update({"num-gpus": 1}), "num-gpus"),
    (lambda rc: rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].update(memory="1Gi"),
     "containers"),
    (lambda rc: rc["spec"]["gcsFaultToleranceOptions"].pop("redisAddress"), "redisAddress"),
    (lambda rc: rc["spec"]["headGroupSpec"]["template"]["spec"].update(terminationGracePeriodSeconds="45"),
     "terminationGracePeriodSeconds"),
], ids=["unknown-field", "non-string-ray-param", "bad-pod-template", "missing-required", "wrong-type"])
def test_crd_check_catches_a_broken_raycluster(crd, default_docs, break_it, where):
    """The CRD check above is not vacuous: each kind of mistake in a RayCluster is reported."""
    rc = copy.deepcopy(only(default_docs, "RayCluster"))
    break_it(rc)
    errors = list(crd_validator(crd, K8S_VERSIONS[-1]).iter_errors(rc))
    assert errors and any(where in f"{list(e.absolute_path)} {e.message}" for e in errors), errors


def test_service_monitor_passes_prometheus_operator_schema(gpu_docs, prometheus_models):
    validate_service_monitor(only(gpu_docs, "ServiceMonitor"), prometheus_models)
    broken = copy.deepcopy(only(gpu_docs, "ServiceMonitor"))
    broken["spec"]["endpoints"][0]["interval"] = "every 15s"
    with pytest.raises(AssertionError, match="interval"):
        validate_service_monitor(broken, prometheus_models)


def test_values_schema_is_valid_json_schema():
    import json

    from deploy_helpers import CHART

    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
