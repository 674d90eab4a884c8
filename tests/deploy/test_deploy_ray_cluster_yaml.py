"""The `ray up` configs pass Ray's own cluster-config checks and keep the spot/on-demand split they promise."""

from __future__ import annotations

import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "ray"
CONFIGS = {"aws": DEPLOY / "aws.yaml", "gcp": DEPLOY / "gcp.yaml"}


def load(cloud: str) -> dict:
    return yaml.safe_load(CONFIGS[cloud].read_text())


def is_spot(cloud: str, node_config: dict) -> bool:
    if cloud == "aws":
        return node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    return node_config.get("scheduling", {}).get("provisioningModel") == "SPOT"


def serve_argv(config: dict) -> list[str]:
    (line,) = [c for c in config["head_start_ray_commands"] if "splitserve serve" in c]
    argv = shlex.split(line)
    return argv[argv.index("splitserve"):argv.index(">")]


@pytest.mark.parametrize("cloud", CONFIGS)
def test_passes_ray_validation(cloud):
    """What `ray up` runs before touching the cloud: defaults merged in, then Ray's JSON schema and checks."""
    prepared = prepare_config(load(cloud))
    validate_config(prepared)
    assert prepared["provider"]["type"] == cloud


@pytest.mark.parametrize("cloud", CONFIGS)
def test_ray_validation_is_not_vacuous(cloud):
    typo = load(cloud)
    typo["available_node_types"]["decode_spot"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(prepare_config(typo))
    too_small = load(cloud)
    too_small["max_workers"] = 0   # below the on-demand decode floor
    with pytest.raises(ValueError, match="max_workers"):
        validate_config(prepare_config(too_small))


@pytest.mark.parametrize("cloud", CONFIGS)
def test_head_on_demand_workers_on_spot_with_role_resources(cloud):
    config = load(cloud)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert not is_spot(cloud, head["node_config"])
    assert not {"splitserve_prefill", "splitserve_decode"} & head["resources"].keys()
    for role in ("prefill", "decode"):
        spot = types[f"{role}_spot"]
        assert is_spot(cloud, spot["node_config"]) and spot["resources"][f"splitserve_{role}"] == 1
        assert spot["max_workers"] > 0
    floor = types["decode_ondemand"]
    assert not is_spot(cloud, floor["node_config"]) and floor["min_workers"] >= 1
    assert floor["resources"]["splitserve_decode"] == 1


@pytest.mark.parametrize("cloud", CONFIGS)
def test_router_runs_with_the_preemption_watcher_and_token_auth(cloud):
    config = load(cloud)
    argv = serve_argv(config)
    assert argv[argv.index("--preemption-watcher") + 1] == cloud
    assert int(argv[argv.index("--drain-deadline") + 1]) <= 30   # within GCP's 30 s spot notice
    assert argv[argv.index("--address") + 1] == "127.0.0.1:6379"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c or "splitserve serve" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), key
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"   # the same token on every node


def test_aws_and_gcp_describe_the_same_cluster():
    aws, gcp = load("aws"), load("gcp")
    assert aws["available_node_types"].keys() == gcp["available_node_types"].keys()
    for name, node in aws["available_node_types"].items():
        other = gcp["available_node_types"][name]
        for bound in ("min_workers", "max_workers"):
            assert node.get(bound) == other.get(bound), (name, bound)
    strip = lambda argv: [a for a in argv if a not in ("aws", "gcp", "25", "30")]  # noqa: E731
    assert strip(serve_argv(aws)) == strip(serve_argv(gcp))
    assert aws["file_mounts"] == gcp["file_mounts"]
