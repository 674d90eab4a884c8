"""What an operator relies on in the rendered chart: drains finish before SIGKILL, probes and budgets exist,
secrets are only referenced, each worker group gets its resources, placement and drain hook."""

from __future__ import annotations

import json
import re
import shlex

import pytest

from deploy_helpers import only

ROUTER_URL = "http://rel-splitserve-router.llm.svc.cluster.local:8000"
# `splitserve serve` flags, exactly as the CLI defines them.
SERVE_FLAGS = {"--address", "--prefill-workers", "--decode-workers", "--model", "--device", "--dtype", "--tp",
               "--http-port", "--grpc-port", "--redis-url", "--api-key-file", "--tls-cert", "--tls-key",
               "--drain-deadline", "--preemption-watcher"}


def groups(docs) -> dict[str, dict]:
    return {g["groupName"]: g for g in only(docs, "RayCluster")["spec"]["workerGroupSpecs"]}


def router_pod(docs) -> dict:
    return only(docs, "Deployment", "-router")["spec"]["template"]


def serve_argv(docs) -> list[str]:
    script = router_pod(docs)["spec"]["containers"][0]["args"][0]
    serve = script[script.index("exec splitserve serve"):]
    return shlex.split(serve)[1:]


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def all_containers(docs):
    """(where, container) for every container and env-carrying sidecar config the chart renders."""
    for d in docs:
        spec = d.get("spec", {})
        if d["kind"] in ("Deployment", "StatefulSet"):
            for c in spec["template"]["spec"]["containers"]:
                yield f"{d['kind']}/{c['name']}", c
        if d["kind"] == "RayCluster":
            for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
                for c in g["template"]["spec"]["containers"]:
                    yield f"RayCluster/{g.get('groupName', 'head')}", c
            if "autoscalerOptions" in spec:
                yield "RayCluster/autoscaler", spec["autoscalerOptions"]


@pytest.mark.parametrize("sets, deadline", [([], 30), (["drain.deadlineSeconds=120"], 120)])
def test_grace_period_outlasts_the_drain(chart, sets, deadline):
    docs = chart.render(sets=sets)
    pods = [g["template"]["spec"] for g in groups(docs).values()] + [router_pod(docs)["spec"]]
    for pod in pods:
        assert pod["terminationGracePeriodSeconds"] > deadline
    assert flag(serve_argv(docs), "--drain-deadline") == str(deadline)
    for g in groups(docs).values():
        hook = g["template"]["spec"]["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
        assert f"--deadline {deadline} " in hook[-1]


@pytest.mark.parametrize("docs_fixture", ["default_docs", "gpu_docs"])
def test_worker_prestop_drains_its_own_node_through_the_router(request, docs_fixture):
    docs = request.getfixturevalue(docs_fixture)
    service = only(docs, "Service", "-router")
    http = next(p for p in service["spec"]["ports"] if p["name"] == "http")
    scheme = "https" if docs_fixture == "gpu_docs" else "http"
    meta = service["metadata"]
    url = f"{scheme}://{meta['name']}.{meta['namespace']}.svc.cluster.local:{http['port']}"
    for name, g in groups(docs).items():
        shell, dash_c, line = g["template"]["spec"]["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
        assert (shell, dash_c) == ("/bin/sh", "-c")
        argv = shlex.split(line)
        assert argv[:3] == ["splitserve", "drain", "$(hostname)"], argv
        assert flag(argv, "--router") == url
        # The Ray node is named after the pod, so the name given to drain is the one the router knows.
        assert g["rayStartParams"]["node-name"] == "$HOSTNAME"


def test_router_probes_and_ports(default_docs):
    container = router_pod(default_docs)["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "grpc": 50051}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health", probe
        assert container[probe]["httpGet"]["port"] == "http", probe
    service = only(default_docs, "Service", "-router")
    assert {(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        ("http", 8000, "http"), ("grpc", 50051, "grpc")}
    assert service["spec"]["selector"].items() <= router_pod(default_docs)["metadata"]["labels"].items()
    argv = serve_argv(default_docs)
    assert (flag(argv, "--http-port"), flag(argv, "--grpc-port")) == ("8000", "50051")


@pytest.mark.parametrize("docs_fixture", ["default_docs", "gpu_docs"])
def test_serve_uses_only_known_flags(request, docs_fixture):
    argv = serve_argv(request.getfixturevalue(docs_fixture))
    used = {a for a in argv if a.startswith("--")}
    assert used <= SERVE_FLAGS, used - SERVE_FLAGS
    assert flag(argv, "--address").endswith("-head-svc.llm.svc.cluster.local:6379")


def test_pdbs_select_each_group(default_docs, gpu_docs):
    for docs in (default_docs, gpu_docs):
        pdbs = {d["metadata"]["name"].rsplit("-", 1)[1]: d["spec"] for d in docs if d["kind"] == "PodDisruptionBudget"}
        pod_labels = {"router": router_pod(docs)["metadata"]["labels"],
                      **{n: g["template"]["metadata"]["labels"] for n, g in groups(docs).items()}}
        assert pdbs.keys() == pod_labels.keys()
        for name, spec in pdbs.items():
            assert spec["maxUnavailable"] >= 1   # a single-replica group must stay drainable
            assert spec["selector"]["matchLabels"].items() <= pod_labels[name].items(), name
            others = [n for n in pod_labels if n != name]
            assert not any(spec["selector"]["matchLabels"].items() <= pod_labels[o].items() for o in others)


def test_pdbs_can_be_turned_off(chart):
    assert not [d for d in chart.render(sets=["podDisruptionBudgets.enabled=false"])
                if d["kind"] == "PodDisruptionBudget"]


@pytest.mark.parametrize("docs_fixture", ["default_docs", "gpu_docs"])
def test_secrets_are_only_referenced(request, docs_fixture):
    docs = request.getfixturevalue(docs_fixture)
    assert not [d for d in docs if d["kind"] == "Secret"], "the chart must not create Secrets"
    for where, c in all_containers(docs):
        env = env_of(c)
        for name, e in env.items():
            if re.search(r"TOKEN|PASSWORD|API_KEY|SECRET|AUTH$", name):
                assert "value" not in e and "secretKeyRef" in e["valueFrom"], f"{where}: {name} is literal"
            for ref in re.findall(r"\$\((\w+)\)", e.get("value", "")):  # e.g. the password inside the Redis URL
                assert "secretKeyRef" in env[ref]["valueFrom"], f"{where}: {name} embeds non-secret {ref}"
    rc = only(docs, "RayCluster")["spec"]
    assert set(rc["gcsFaultToleranceOptions"]["redisPassword"]) == {"valueFrom"}


@pytest.mark.parametrize("docs_fixture", ["default_docs", "gpu_docs"])
def test_every_ray_process_uses_token_auth(request, docs_fixture):
    docs = request.getfixturevalue(docs_fixture)
    expected_secret = "splitserve-secrets" if docs_fixture == "default_docs" else "llm-prod-ray"
    ray_containers = [(w, c) for w, c in all_containers(docs) if w.startswith(("RayCluster", "Deployment/router"))]
    assert len(ray_containers) == 5   # head, prefill, decode, autoscaler, router
    for where, c in ray_containers:
        env = env_of(c)
        assert env["RAY_AUTH_MODE"]["value"] == "token", where
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == expected_secret, where


def test_worker_groups_get_their_resources_and_ray_resource(default_docs, gpu_docs):
    cases = ((default_docs, 0, {"prefill": "4", "decode": "4"}), (gpu_docs, 2, {"prefill": "16", "decode": "8"}))
    for docs, gpus, cpu in cases:
        for name, g in groups(docs).items():
            # KubeRay pastes rayStartParams into a bash command line: what bash makes of it must be the JSON.
            (resources,) = shlex.split(g["rayStartParams"]["resources"])
            assert json.loads(resources) == {f"splitserve_{name}": 1}
            res = g["template"]["spec"]["containers"][0]["resources"]
            assert res["requests"]["cpu"] == res["limits"]["cpu"] == cpu[name]
            assert "memory" in res["requests"] and "memory" in res["limits"]
            assert res["limits"].get("nvidia.com/gpu", 0) == res["requests"].get("nvidia.com/gpu", 0) == gpus
    head = only(default_docs, "RayCluster")["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"   # no worker actor ever lands on the head


def test_replica_bounds_reach_the_autoscaler(gpu_docs):
    g = groups(gpu_docs)
    assert (g["prefill"]["minReplicas"], g["prefill"]["replicas"], g["prefill"]["maxReplicas"]) == (1, 2, 6)
    assert (g["decode"]["minReplicas"], g["decode"]["replicas"], g["decode"]["maxReplicas"]) == (2, 4, 12)
    spec = only(gpu_docs, "RayCluster")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["upscalingMode"] == "Conservative"


def test_spot_placement_only_where_asked(gpu_docs):
    g = groups(gpu_docs)
    spot = {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"}
    decode, prefill = g["decode"]["template"]["spec"], g["prefill"]["template"]["spec"]
    assert spot in decode["tolerations"] and decode["nodeSelector"]["cloud.google.com/gke-spot"] == "true"
    assert spot not in prefill["tolerations"] and "cloud.google.com/gke-spot" not in prefill["nodeSelector"]
    assert decode["priorityClassName"] == "llm-serving"
    head = only(gpu_docs, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]
    assert "tolerations" not in head   # the head must never be scheduled onto a spot pool


def test_model_from_pvc_is_mounted_at_the_same_path_everywhere(gpu_docs):
    path = "/models/Llama-2-7b-chat-hf"
    assert flag(serve_argv(gpu_docs), "--model") == path
    pods = [router_pod(gpu_docs)["spec"]] + [g["template"]["spec"] for g in groups(gpu_docs).values()]
    for pod in pods:
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["model"]["persistentVolumeClaim"] == {"claimName": "llama-2-7b-hf", "readOnly": True}
        container = pod["containers"][0]
        assert {"name": "model", "mountPath": "/models", "readOnly": True} in container["volumeMounts"]
        assert env_of(container)["SPLITSERVE_MODEL"]["value"] == path


def test_packaged_model_needs_no_volume(default_docs):
    assert "--model" not in serve_argv(default_docs)
    assert "model" not in {v["name"] for v in router_pod(default_docs)["spec"]["volumes"]}


def test_internal_redis_is_persistent_and_backs_gcs_and_journal(default_docs):
    sts = only(default_docs, "StatefulSet", "-redis")
    args = sts["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "8Gi"
    host = "rel-splitserve-redis.llm.svc.cluster.local"
    assert only(default_docs, "Service", "-redis")["metadata"]["name"] == host.split(".")[0]
    gcs = only(default_docs, "RayCluster")["spec"]["gcsFaultToleranceOptions"]
    assert gcs["redisAddress"] == f"{host}:6379"
    url = env_of(router_pod(default_docs)["spec"]["containers"][0])["SPLITSERVE_REDIS_URL"]["value"]
    assert url == f"redis://:$(SPLITSERVE_REDIS_PASSWORD)@{host}:6379/0"


def test_external_redis_replaces_the_statefulset(gpu_docs):
    gcs = only(gpu_docs, "RayCluster")["spec"]["gcsFaultToleranceOptions"]
    assert gcs["redisAddress"] == "rediss://redis-llm.prod.internal:6380"
    url = env_of(router_pod(gpu_docs)["spec"]["containers"][0])["SPLITSERVE_REDIS_URL"]["value"]
    assert url == "rediss://:$(SPLITSERVE_REDIS_PASSWORD)@redis-llm.prod.internal:6380/2"


def test_api_key_and_tls_come_from_mounted_secrets(gpu_docs, chart):
    pod = router_pod(gpu_docs)["spec"]
    volumes = {v["name"]: v.get("secret", {}) for v in pod["volumes"]}
    assert volumes["api-key"]["secretName"] == "llm-prod-api" and volumes["tls"]["secretName"] == "llm-prod-router-tls"
    argv = serve_argv(gpu_docs)
    assert flag(argv, "--api-key-file") == "/etc/splitserve/api-key/api-key"
    assert flag(argv, "--tls-cert") == "/etc/splitserve/tls/tls.crt"
    assert flag(argv, "--tls-key") == "/etc/splitserve/tls/tls.key"
    assert pod["containers"][0]["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    no_key = chart.render(sets=["secrets.apiKey.name="])
    assert "--api-key-file" not in serve_argv(no_key)
    assert all("SPLITSERVE_API_KEY" not in env_of(c) for _, c in all_containers(no_key))
