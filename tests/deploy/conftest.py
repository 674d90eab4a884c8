"""Fixtures for the deployment tests: a real helm binary, rendered charts, and the schemas they must pass.

helm comes from .ci/install_helm.sh. Under CI (CI=true) a missing tool is a failure, never a skip: a chart
that is not rendered is not tested.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from deploy_helpers import CRD, GPU_SPOT_VALUES, TOOLS_DIR, Helm, missing_tool


@pytest.fixture(scope="session")
def helm() -> str:
    found = shutil.which("helm") or next(
        (str(p) for p in [Path.home() / ".local" / "bin" / "helm"] if p.exists()), None)
    if not found:
        missing_tool("helm")
    version = subprocess.run([found, "version", "--short"], capture_output=True, text=True, check=True).stdout
    assert version.startswith(("v3.", "v4.")), version
    return found


@pytest.fixture(scope="session")
def chart(helm) -> Helm:
    return Helm(helm)


@pytest.fixture(scope="session")
def default_docs(chart) -> list[dict]:
    return chart.render()


@pytest.fixture(scope="session")
def gpu_docs(chart) -> list[dict]:
    return chart.render([GPU_SPOT_VALUES])


@pytest.fixture(scope="session")
def crd() -> dict:
    return yaml.safe_load(CRD.read_text())


@pytest.fixture(scope="session")
def prometheus_models() -> Path:
    path = TOOLS_DIR / "node_modules" / "@kubernetes-models" / "prometheus-operator"
    if not path.exists() or not shutil.which("node"):
        missing_tool("node with @kubernetes-models/prometheus-operator")
    return TOOLS_DIR
