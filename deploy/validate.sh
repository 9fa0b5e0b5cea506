#!/usr/bin/env bash
# Offline checks of everything in deploy/ (part of the README's test command, so CI runs it):
#   - each profile copy beside a manifest matches profiles/ and passes `runtime validate`;
#   - the base and every overlay render with kustomize (`kubectl kustomize`, when kubectl is
#     installed) and every object validates against the Kubernetes schemas (PyPI
#     kubernetes-validate, --strict: unknown fields are errors), as does every plain manifest;
#   - yamllint on every YAML file;
#   - terminationGracePeriodSeconds covers each overlay profile's drain_timeout plus the
#     preStop pause and the runtime's abort grace;
#   - the Dockerfiles build with the README's own build command;
#   - the systemd units parse (`systemd-analyze verify`, when installed).
# What cannot run here: no cluster and no container daemon, so nothing is applied or built.
set -euo pipefail
cd "$(dirname "$0")/.."
K8S_VERSION="${K8S_VERSION:-1.31.0}"
venv=target/deploy-venv
# A venv whose tools do not run (missing, or moved with its folder: its scripts' shebangs name
# the old path) is made again.
if ! "$venv/bin/kubernetes-validate" --version > /dev/null 2>&1 || ! "$venv/bin/yamllint" --version > /dev/null 2>&1; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'kubernetes-validate==1.37.0' 'yamllint==1.35.1'
fi
out=target/deploy-rendered
rm -rf "$out" && mkdir -p "$out"
fail() { echo "deploy/validate.sh: $*" >&2; exit 1; }

# Profile copies: base = default, overlays = the profile of the same name (gpu = h100-minilm).
check_copy() { # copy original
  cmp -s "$1" "$2" || fail "$1 differs from $2 (copy it again: cp $2 $1)"
  if [ -x target/debug/runtime ]; then
    target/debug/runtime validate --rules-only "$1" > /dev/null || fail "$1 is not a valid profile"
  fi
}
check_copy deploy/k8s/base/profile.toml profiles/default.toml
for d in deploy/k8s/overlays/*/; do
  name=$(basename "$d")
  src=profiles/$name.toml
  [ "$name" = gpu ] && src=profiles/h100-minilm.toml
  check_copy "$d/profile.toml" "$src"
done

# Render and validate.
if command -v kubectl > /dev/null; then
  kubectl kustomize deploy/k8s/base > "$out/base.yaml"
  for d in deploy/k8s/overlays/*/; do
    kubectl kustomize "$d" > "$out/$(basename "$d").yaml"
  done
else
  echo "deploy/validate.sh: kubectl not installed: overlays not rendered; validating the base's plain manifests" >&2
  cp deploy/k8s/base/{deployment,service,pdb,hpa}.yaml "$out/"
fi
cp deploy/k8s/grid/*.yaml deploy/k8s/monitoring/*.yaml "$out/"
"$venv/bin/kubernetes-validate" --strict --quiet -k "$K8S_VERSION" "$out"/*.yaml \
  || fail "manifests do not validate against Kubernetes $K8S_VERSION"
"$venv/bin/yamllint" -d '{extends: default, rules: {line-length: {max: 110}, document-start: disable, truthy: {check-keys: false}}}' \
  deploy/k8s || fail "yamllint"

# Grace period: drain_timeout + preStop sleep + 2 × abort grace (2 s) must fit.
python3 - "$out" <<'PY'
import pathlib, re, sys
out = pathlib.Path(sys.argv[1])
def secs(v):
    m = re.fullmatch(r'"?(\d+(?:\.\d+)?)(ms|s|m)?"?', v.strip())
    n, u = float(m.group(1)), m.group(2) or "s"
    return n / 1000 if u == "ms" else n * 60 if u == "m" else n
for f in sorted(out.glob("*.yaml")):
    text = f.read_text()
    grace = re.search(r"terminationGracePeriodSeconds: (\d+)", text)
    if not grace or "kind: Deployment" not in text:
        continue
    drain = re.search(r"^\s*drain_timeout\s*=\s*(\S+)", text, re.M)
    drain = secs(drain.group(1)) if drain else 30.0
    pre = re.search(r'command: \["sleep", "(\d+)"\]', text)
    need = drain + (int(pre.group(1)) if pre else 0) + 4
    if int(grace.group(1)) < need:
        sys.exit(f"{f.name}: terminationGracePeriodSeconds {grace.group(1)} < drain {drain} s + preStop + abort grace = {need} s")
    print(f"{f.name}: grace {grace.group(1)} s covers drain {drain:g} s + preStop + abort grace ({need:g} s)")
PY

# The Dockerfiles build with the README's build command.
build=$(grep -o 'cargo build --release --workspace' README.md | head -1)
[ -n "$build" ] || fail "README has no build command"
for f in deploy/Dockerfile deploy/Dockerfile.cuda; do
  grep -q "RUN $build" "$f" || fail "$f does not build with the README's command ($build)"
done

# systemd units (systemd-analyze prints problems and still exits 0: any output is a failure).
if command -v systemd-analyze > /dev/null; then
  tmp=$(mktemp -d)
  cp deploy/systemd/batchtune@.service "$tmp/batchtune@0.service"
  cp deploy/systemd/batchtune.target "$tmp/"
  msgs=$(cd "$tmp" && systemd-analyze verify --man=no ./batchtune@0.service ./batchtune.target 2>&1 | grep -v 'batchtune@1.service' || true)
  rm -rf "$tmp"
  [ -z "$msgs" ] || fail "systemd units: $msgs"
else
  echo "deploy/validate.sh: systemd-analyze not installed: units not checked" >&2
fi
echo "deploy/validate.sh: ok ($(ls "$out" | wc -l) manifest files valid against Kubernetes $K8S_VERSION)"
