#!/usr/bin/env bash
# Builds the pcrl image from a plain Debian base on this machine and runs pcrl inside it, end to end:
#   1. a Debian bookworm base image from Debian's packages (mmdebstrap --variant=minbase; no registry needed)
#   2. docker/Dockerfile built on it with buildah (chroot isolation), torch from a local CPU wheel if pip finds
#      one for the image's Python, else from the CPU index (download.pytorch.org/whl/cpu)
#   3. inside the image, as its non-root user: real sample volumes fetched (python -m data_prep.fetch) and
#      sharded (data_prep.shard), a short pretraining through the deepspeed launcher (configs/pretrain/tiny.yaml),
#      the encoder exported (launch/export.py) and loaded with pcrl.load_encoder
# It prints the build time and the image size, exits non-zero on any failure, and removes the images and
# containers it made (also when it fails). It is not part of `make test` (9 to 18 minutes on two cores here,
# and network access to Debian's mirror and PyPI). Needs root (or rootless buildah) and, if missing,
# installs buildah and mmdebstrap with apt-get.
#
#   bash docker/check.sh 2>&1 | tee check.log
#
# Environment: CA_BUNDLE (the certificates pip trusts inside the build and the run, default this machine's
# /etc/ssl/certs/ca-certificates.crt, so that a machine behind a TLS-inspecting proxy works; "none": the image's
# own), PCRL_TORCH_WHEEL (a torch wheel for Linux x86_64 and Python 3.11, the image's Python, to use
# instead of looking for one), TORCH_VERSION (default 2.13.0), STEPS (pretraining steps, default 6),
# KEEP_IMAGE=1 (keep the built image, named localhost/pcrl-check:<id>, for a look inside).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
STEPS=${STEPS:-6}
id=$$
base=localhost/pcrl-check-base:$id
image=localhost/pcrl-check:$id
work=$(mktemp -d "${TMPDIR:-/tmp}/pcrl-check.XXXXXX")
wheel_dir=docker/wheels/check-$id
containers=()

say() { printf '\n== check: %s\n' "$*"; }
fail() { printf 'check: FAILED: %s\n' "$*" >&2; exit 1; }

cleanup() {
  local status=$?
  for c in "${containers[@]}"; do buildah rm "$c" >/dev/null 2>&1 || true; done
  if [ "${KEEP_IMAGE:-0}" != 1 ]; then buildah rmi "$image" >/dev/null 2>&1 || true; fi
  buildah rmi "$base" >/dev/null 2>&1 || true
  rm -rf "$work" "$wheel_dir"
  rmdir docker/wheels 2>/dev/null || true
  if [ "$status" = 0 ]; then echo "check: PASSED"; else echo "check: FAILED (exit $status)" >&2; fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- tools -------------------------------------------------------------------------------------------
if ! command -v buildah >/dev/null || ! command -v mmdebstrap >/dev/null; then
  command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] \
    || fail "buildah and mmdebstrap are missing; install them (Debian: apt-get install buildah mmdebstrap)"
  say "installing buildah and mmdebstrap from Debian"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends buildah mmdebstrap >/dev/null
fi

# --- 1. the base image: Debian bookworm from Debian's own packages --------------------------------------
say "Debian bookworm base (mmdebstrap --variant=minbase)"
t0=$SECONDS
mmdebstrap --quiet --variant=minbase bookworm "$work/base.tar" || fail "mmdebstrap could not make the base"
# buildah has no `import` before 1.34 (podman does): add the tar to an empty image instead.
c=$(buildah from scratch)
containers+=("$c")
buildah add --quiet "$c" "$work/base.tar" / >/dev/null
buildah config --cmd /bin/bash "$c"
buildah commit --quiet "$c" "$base" >/dev/null
buildah rm "$c" >/dev/null
containers=()
rm -f "$work/base.tar"
base_s=$((SECONDS - t0))
echo "base image $base in ${base_s} s"

# --- 2. the image ------------------------------------------------------------------------------------
# torch for the image's Python (3.11 on bookworm). The build context cannot see this machine's pip settings,
# so a wheel that pip finds here (a local wheel folder) is put into the context, under docker/wheels/ (ignored
# by git). The `+cpu` local version makes pip refuse PyPI's CUDA build (several GB) rather than download it.
build_args=(--build-arg "BASE=$base")
wheel=${PCRL_TORCH_WHEEL:-}
if [ -z "$wheel" ]; then
  if python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 --implementation cp \
       --abi cp311 --platform manylinux_2_28_x86_64 --dest "$work/wheels" "torch==${TORCH_VERSION}+cpu" \
       >"$work/pip-download.log" 2>&1; then
    wheel=$(ls "$work"/wheels/torch-*.whl)
  fi
fi
if [ -n "$wheel" ]; then
  [ -f "$wheel" ] || fail "PCRL_TORCH_WHEEL=$wheel: no such file"
  mkdir -p "$wheel_dir"
  ln "$wheel" "$wheel_dir/" 2>/dev/null || cp "$wheel" "$wheel_dir/"
  build_args+=(--build-arg "TORCH_WHEEL=wheels/check-$id/$(basename "$wheel")")
  echo "torch from $(basename "$wheel")"
else
  echo "no local torch ${TORCH_VERSION}+cpu wheel; the build takes torch from https://download.pytorch.org/whl/cpu"
fi

# pip inside the build and the run trusts this machine's certificates (mounted, never part of the image).
mounts=()
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
if [ "$CA_BUNDLE" != none ]; then
  [ -f "$CA_BUNDLE" ] || fail "CA_BUNDLE=$CA_BUNDLE: no such file (give a PEM bundle, or none)"
  printf '[global]\ncert = /etc/pcrl-check-ca.pem\n' >"$work/pip.conf"
  mounts=(-v "$CA_BUNDLE:/etc/pcrl-check-ca.pem:ro" -v "$work/pip.conf:/etc/pip.conf:ro")
fi

say "building docker/Dockerfile on $base (buildah bud --isolation chroot)"
t0=$SECONDS
buildah bud --isolation chroot --layers=false --force-rm "${mounts[@]}" "${build_args[@]}" --build-arg "TORCH_VERSION=$TORCH_VERSION" \
  -f docker/Dockerfile -t "$image" . || fail "the image build failed (output above)"
build_s=$((SECONDS - t0))
size=$(buildah images --format '{{.Size}}' "$image")
echo "image $image: built in ${build_s} s, size $size"

# --- 3. pcrl inside the image ------------------------------------------------------------------------
c=$(buildah from "$image")
containers+=("$c")
# run_in [buildah run options] -- COMMAND...
run_in() {
  local opts=()
  while [ "$1" != -- ]; do opts+=("$1"); shift; done
  shift
  buildah run --isolation chroot --env HOME=/home/pcrl --env DS_ACCELERATOR=cpu \
    --env MLFLOW_DISABLE_TELEMETRY=true --env DO_NOT_TRACK=true --env RAY_USAGE_STATS_ENABLED=0 \
    "${mounts[@]}" "${opts[@]}" "$c" -- "$@"
}
say "inside the image: who runs, and what is installed"
run_in -- bash -c 'id; python --version; pip list 2>/dev/null | grep -iE "^(torch|deepspeed|nvidia-dali-cuda[0-9]+|pcrl) "
  python -c "import nvidia.dali as dali; print(\"DALI\", dali.__version__, \"imports\")"'
[ "$(run_in -- id -u)" = 1000 ] || fail "the image does not run as its non-root user (uid 1000)"

# The steps inside the image, as a script mounted read-only (the image holds no copy of this check).
cat >"$work/inside.sh" <<'SH'
set -euo pipefail
cd /opt/pcrl
w=$HOME/check
echo "== fetch real sample volumes (python -m data_prep.fetch)"
python -m data_prep.fetch --dest "$w/samples"
echo "== shard them (python -m data_prep.shard)"
python -m data_prep.shard --input "$w/samples/pyradiomics" --exclude '*_label*' --output "$w/shards" \
  --split train=1.0 --workers 2
echo "== pretrain $STEPS steps through the deepspeed launcher"
deepspeed --num_gpus 1 launch/pretrain.py --config configs/pretrain/tiny.yaml data.shards="$w/shards" \
  run.output_dir="$w/runs" run.name=check train.max_steps="$STEPS" train.log_every=1 tracking.image_every=0
echo "== export the encoder (launch/export.py)"
python launch/export.py "$w/runs/check"
echo "== load it with pcrl.load_encoder"
python - "$w/runs/check" <<'PY'
import json
import sys
from pathlib import Path

import torch

import pcrl

run = Path(sys.argv[1])
encoder = pcrl.load_encoder(run)
meta = json.loads((run / "encoder.json").read_text())
m = meta["architecture"]["input_multiple"]
with torch.no_grad():
    features = encoder(torch.randn(1, 1, 2 * m, 2 * m, 2 * m))
assert all(torch.isfinite(f).all() for f in features), "non-finite features"
shapes = ", ".join(str(tuple(f.shape)) for f in features)
print(f"loaded the encoder of step {meta['training']['step']}: {len(features)} feature maps {shapes}")
PY
SH
t0=$SECONDS
run_in --env STEPS="$STEPS" -v "$work/inside.sh:/tmp/pcrl-check-inside.sh:ro" \
  -- bash /tmp/pcrl-check-inside.sh || fail "pcrl inside the image (output above)"
run_s=$((SECONDS - t0))

say "summary"
echo "base image ${base_s} s; image build ${build_s} s; image size $size; fetch+shard+pretrain+export+load ${run_s} s"
