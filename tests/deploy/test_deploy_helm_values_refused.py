"""Bad values are refused before anything reaches the cluster, with a message that names the field."""

from __future__ import annotations

import pytest

from deploy_helpers import GPU_SPOT_VALUES

# (--set overrides, text the error must contain). Schema refusals name the JSON path.
REFUSED = [
    (["secrets.apiKey.value=hunter2"], "/secrets/apiKey"),                       # literal secrets have no field
    (["secrets.rayToken.name="], "/secrets/rayToken/name"),                      # Ray token auth is mandatory
    (["redis.auth.password=hunter2"], "/redis/auth"),
    (["redis.mode=external"], "/redis/external/host"),                           # external needs a host
    (["redis.mode=external", "redis.external.host=redis://:pw@cache:6379"], "/redis/external/host"),
    (["drain.graceMarginSeconds=0"], "/drain/graceMarginSeconds"),               # grace must exceed the deadline
    (["drain.deadlineSeconds=0"], "/drain/deadlineSeconds"),
    (["device=tpu"], "/device"),
    (["device=cuda"], "/prefill/gpus"),                                          # cuda without GPUs
    (["prefill.gpus=1"], "/prefill/gpus"),                                       # GPUs requested on cpu
    (["dtype=bfloat16"], "/dtype"),                                              # the CPU path is float32
    (["tensorParallel=0"], "/tensorParallel"),
    (["decode.maxReplicas=0"], "/decode/maxReplicas"),
    (["decode.replicas=-1"], "/decode/replicas"),
    (["prefill.resources.requests.cpu=lots"], "/prefill/resources/requests/cpu"),
    (["decode.resources.requests=null"], "/decode/resources"),                   # every group states its size
    (["prefill.rayStartParams.resources=x"], "/prefill/rayStartParams"),         # the role resource is the chart's
    (["decode.tolerations[0].effect=Sometimes"], "/decode/tolerations/0/effect"),
    (["decode.pdb.maxUnavailable=0"], "/decode/pdb/maxUnavailable"),             # would block every node drain
    (["model.source=pvc"], "/model/pvc/claimName"),
    (["model.source=hostPath"], "/model/hostPath/path"),
    (["model.source=pvc", "model.pvc.claimName=w", "model.subPath=../etc"], "/model/subPath"),
    (["model.subPath=llama"], "/model/subPath"),                                 # no volume to find it in
    (["preemptionWatcher=ibm"], "/preemptionWatcher"),
    (["router.replicas=0"], "/router/replicas"),
    (["router.service.httpPort=70000"], "/router/service/httpPort"),
    (["serviceMonitor.interval=often"], "/serviceMonitor/interval"),
    (["routr.replicas=2"], "routr"),                                             # typos are not ignored
    # Cross-field rules the template enforces (a JSON schema cannot compare two values).
    (["prefill.replicas=9"], "minReplicas (1) <= replicas (9) <= maxReplicas (4)"),
    (["router.service.grpcPort=8000"], "must differ"),
]


@pytest.mark.parametrize("sets, names", REFUSED, ids=[" ".join(s) for s, _ in REFUSED])
def test_bad_values_are_refused(chart, sets, names):
    assert names in chart.refuse(sets)


def test_tensor_parallel_must_fit_in_a_pod(chart):
    error = chart.refuse(["tensorParallel=4"], values=[GPU_SPOT_VALUES])
    assert "prefill.gpus (2) must be >= tensorParallel (4)" in error


def test_lint_refuses_what_template_refuses(chart):
    out = chart.run("lint", sets=["device=tpu"])
    assert out.returncode != 0 and "/device" in out.stdout + out.stderr
