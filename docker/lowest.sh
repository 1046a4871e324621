#!/usr/bin/env bash
# Are pyproject.toml's lower bounds true? Installs exactly the lowest version each one allows, in a fresh venv,
# and runs the part of the test suite that uses them:
#   - every runtime dependency and the prep extra (pinned ==BOUND), and pytest/pytest-timeout at theirs;
#   - torch first, pinned (TORCH_SPEC, default torch==BOUND), so that no dependency pulls another build;
#   - pip check, then the tests below (unit tests of every stage, the data_prep readers, DICOM, Zarr,
#     checkpoints, export, figures, probe, and the integration tests through the real deepspeed launcher
#     and MLflow).
# Not covered: the ray, dali, bench and dev-tool extras (ruff, playwright), whose tests are skipped or left out.
# Not part of `make test` (a second venv: several minutes and about 2 GB of downloads).
#
#   bash docker/lowest.sh 2>&1 | tee lowest.log
#   LOWEST_VENV=/tmp/lowest KEEP=1 bash docker/lowest.sh tests/test_model.py    # a venv to keep, other tests
#
# Environment: PYTHON (the interpreter the venv is made from, default python3), TORCH_SPEC (how to ask pip for
# torch; a CPU machine without a local wheel: TORCH_SPEC="torch==2.13.0 --index-url
# https://download.pytorch.org/whl/cpu"), LOWEST_VENV (where to make the venv; default a temporary folder),
# KEEP=1 (keep it), PIN (extra requirements that override a bound, e.g. PIN="numpy==2.0.2", to try a set).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
made_tmp=
if [ -z "${LOWEST_VENV:-}" ]; then
  made_tmp=$(mktemp -d "${TMPDIR:-/tmp}/pcrl-lowest.XXXXXX")
  LOWEST_VENV=$made_tmp/venv
fi
cleanup() {
  if [ "${KEEP:-0}" != 1 ] && [ -n "$made_tmp" ]; then rm -rf "$made_tmp"; fi
}
trap cleanup EXIT

# name==bound for every ">=" in the runtime dependencies, the prep extra and the test runner's packages.
mapfile -t pins < <("$PYTHON" - <<'PY'
import re
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = project["dependencies"] + project["optional-dependencies"]["prep"]
reqs += [r for r in project["optional-dependencies"]["dev"] if r.startswith(("pytest", "pytest-timeout"))]
for req in reqs:
    req = req.split(";")[0]
    m = re.fullmatch(r"([A-Za-z0-9_.\[\],-]+)\s*>=\s*([0-9][0-9.]*)", req.strip())
    if not m:
        raise SystemExit(f"pyproject.toml: {req!r} has no plain lower bound (NAME>=VERSION); lowest.sh cannot pin it")
    print(f"{m[1]}=={m[2]}")
PY
)
torch_pin=""
rest=()
for p in "${pins[@]}"; do
  case "$p" in torch==*) torch_pin=$p ;; *) rest+=("$p") ;; esac
done
read -r -a torch_spec <<<"${TORCH_SPEC:-$torch_pin}"
read -r -a extra <<<"${PIN:-}"
# A PIN for a package replaces its bound.
if [ ${#extra[@]} -gt 0 ]; then
  keep=()
  for p in "${rest[@]}"; do
    name=${p%%==*}
    over=0
    for e in "${extra[@]}"; do [ "${e%%[=<>]*}" = "$name" ] && over=1; done
    [ "$over" = 0 ] && keep+=("$p")
  done
  rest=("${keep[@]}" "${extra[@]}")
fi

echo "lowest: ${torch_spec[*]} ${rest[*]}"
"$PYTHON" -m venv "$LOWEST_VENV"
pip=("$LOWEST_VENV/bin/python" -m pip)
"${pip[@]}" install --quiet --upgrade pip
"${pip[@]}" install --quiet "${torch_spec[@]}"
torch_have=$("$LOWEST_VENV/bin/python" -c 'import torch; print(torch.__version__)')
# pcrl itself built with the lowest setuptools [build-system] allows (no build isolation, so this one is used).
build_req=$("$PYTHON" -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"])')
"${pip[@]}" install --quiet ${build_req//>=/==}
"${pip[@]}" install --quiet --no-build-isolation -e '.[prep]' "torch==$torch_have" ${build_req//>=/==} "${rest[@]}"
"${pip[@]}" check
echo "installed:"
"${pip[@]}" freeze --exclude-editable | grep -iE "^($(printf '%s|' "${pins[@]%%==*}" "${extra[@]%%[=<>]*}")x)==" \
  | sed 's/^/  /'

tests=("$@")
if [ ${#tests[@]} -eq 0 ]; then
  tests=(tests/test_config.py tests/test_model.py tests/test_objective.py tests/test_views.py tests/test_data.py
    tests/test_data_prep.py tests/test_dicom.py tests/test_zarr.py tests/test_checkpoint.py tests/test_export.py
    tests/test_figures.py tests/test_probe.py tests/test_evaluate.py tests/test_pretrain.py
    # the sweep config needs the ray extra, which is not installed here
    --deselect "tests/test_config.py::test_config_every_yaml_loads[configs/tune/loss_weights.yaml]")
fi
# The suite's own settings, and the test venv's tools on PATH (the deepspeed launcher).
export DS_ACCELERATOR=cpu OMP_WAIT_POLICY=PASSIVE MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
export TORCH_EXTENSIONS_DIR=$LOWEST_VENV/torch_extensions   # this DeepSpeed's JIT ops, apart from any other
PATH=$LOWEST_VENV/bin:$PATH "$LOWEST_VENV/bin/python" -m pytest -q -p no:cacheprovider "${tests[@]}"
echo "lowest: PASSED with ${torch_spec[*]} ${rest[*]}"
