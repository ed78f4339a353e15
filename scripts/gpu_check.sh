#!/usr/bin/env bash
# The checks only a GPU can run, in one go (under 8 minutes on one H100/H200):
#
#   1. every CUDA-only test (the test files that skip without torch.cuda.is_available());
#   2. precompute on a random-init target of Llama-3.1-8B's full shape (32 layers, hidden 4096,
#      vocabulary 128,256) in bf16 against a bare forward over the same batches: the overhead ratio,
#      and the peak device memory of run_precompute (benchmarks/precompute_overhead.py);
#   3. peak device memory of one DFlash loss + backward at 512 anchors, block 16, S 4096, unchunked
#      against the trainer's path, and of one EAGLE-3 TTT step (T 2048, 7 steps), both at 8B widths
#      and a 128k vocabulary under bf16 autocast (benchmarks/scale_training.py);
#   4. the vLLM runner's engine tests where a GPU build of vLLM is importable (else: skipped, and why);
#   5. a DSpark draft of the embedded default served by that vLLM (method "dspark", which the CPU
#      build refuses): load check, output equal to plain greedy and to ours, acceptance counters
#      (scripts/dspark_vllm_gpu.py; the dry run trains, exports and evaluates it on CPU without vLLM).
#
#   scripts/gpu_check.sh              on the GPU machine; prints every figure and a summary
#   scripts/gpu_check.sh --dry-run    everything but the GPU steps, on CPU at the smallest sizes (CI)
#
# No install is needed: the script runs the repository's src/ (PYTHONPATH) with the python on PATH
# (PYTHON overrides it), which must already have torch, transformers, safetensors, pyarrow, datasets,
# tqdm, typer and pytest (the GPU machine has no network; an editable install there works as well).
# Each step has its own time limit; a failed step is reported and the others still run; the exit
# status is non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
PY="${PYTHON:-python}"
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
if [ $# -gt 0 ]; then echo "usage: scripts/gpu_check.sh [--dry-run]" >&2; exit 2; fi
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
LOG="$(mktemp -d "${TMPDIR:-/tmp}/draftcache-gpu-check.XXXXXX")"
SUMMARY=()
FAILED=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, tee its output, record the outcome
  local name="$1" limit="$2"; shift 2
  local start=$SECONDS
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" 2>&1 | tee "$LOG/$name.log"
  local rc=${PIPESTATUS[0]}
  local took=$((SECONDS - start))
  if [ "$rc" -eq 0 ]; then
    SUMMARY+=("ok      $name (${took}s)")
  else
    SUMMARY+=("FAILED  $name (exit $rc after ${took}s; log $LOG/$name.log)")
    FAILED=1
  fi
}

missing=$("$PY" - <<'EOF'
import importlib.util
need = ["torch", "transformers", "safetensors", "pyarrow", "datasets", "tqdm", "typer", "pytest", "draftcache"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
  echo "gpu_check: $PY cannot import: $missing (install them, or set PYTHON to an interpreter that has them)" >&2
  exit 2
fi

if [ "$DRY" -eq 0 ]; then
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch sees no CUDA device here; run with --dry-run for the CPU rehearsal" >&2
    exit 2
  fi
  DEVICE=cuda
  "$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'device: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}')"
else
  DEVICE=cpu
  echo "device: none (dry run: CPU, smallest sizes; the CUDA tests are only collected)"
fi

# 1. CUDA-only tests: every test file that skips without a CUDA device
CUDA_TESTS=$(grep -rlE "skipif\(not torch\.cuda\.is_available\(\)" tests --include='*.py' | sort)
if [ "$DRY" -eq 1 ]; then
  step cuda-tests 120 "$PY" -m pytest -q -p no:cacheprovider --collect-only $CUDA_TESTS
else
  step cuda-tests 150 "$PY" -m pytest -q -p no:cacheprovider -rs $CUDA_TESTS
fi

# 2. precompute at Llama-3.1-8B's full shape against a bare forward, and its peak device memory
if [ "$DRY" -eq 1 ]; then
  step precompute-overhead 120 "$PY" benchmarks/precompute_overhead.py --device cpu --num-layers 3 \
    --num-samples 4 --shard-size 2 --vocab-size 512 --draft-vocab-size 64 --repeats 1 --seq-length 64 \
    --median-tokens 32
else
  step precompute-overhead 240 "$PY" benchmarks/precompute_overhead.py --device cuda --shape llama-3.1-8b \
    --num-layers 32 --num-samples 32 --batch-size 4 --shard-size 8 --seq-length 2048 --median-tokens 1024 \
    --draft-vocab-size 32000 --repeats 2
fi

# 3. training memory: DFlash unchunked vs chunked at 512 anchors, one EAGLE-3 step, 8B widths
if [ "$DRY" -eq 1 ]; then
  step training-memory 120 "$PY" benchmarks/scale_training.py --device cpu --hidden 32 --heads 4 --kv-heads 2 \
    --head-dim 8 --intermediate 48 --vocab 256 --seq 48 --block 4 --anchors 8 --target-anchors 8 \
    --eagle3-seq 16 --draft-vocab 64 --ttt-steps 2
else
  step training-memory 240 "$PY" benchmarks/scale_training.py --device cuda --anchors 512 --target-anchors 512 \
    --eagle3-seq 2048
fi

# 4. the vLLM runner, where a GPU build of vLLM is importable
why=$("$PY" - <<'EOF'
import importlib.util
if importlib.util.find_spec("vllm") is None:
    print("vLLM is not installed for this python")
else:
    try:
        from vllm.platforms import current_platform
        if not current_platform.is_cuda():
            print(f"the installed vLLM is a {current_platform.device_type} build, not a CUDA one")
    except Exception as error:  # a broken install says why
        print(f"vLLM does not import: {type(error).__name__}: {error}")
EOF
)
if [ "$DRY" -eq 1 ] && [ -z "$why" ]; then why="dry run"; fi
if [ -n "$why" ]; then
  echo "=== vllm-runner: skipped ($why)"
  SUMMARY+=("skipped vllm-runner ($why)")
else
  step vllm-runner 120 env DRAFTCACHE_ENGINE_TIER=1 "$PY" -m pytest -q -p no:cacheprovider -m engine \
    tests/engine/test_vllm_runner.py
fi

# 5. DSpark served by a CUDA vLLM (the dry run: train, export, our eval, no vLLM)
if [ "$DRY" -eq 1 ]; then
  step dspark-vllm 120 "$PY" scripts/dspark_vllm_gpu.py --dry-run --num-prompts 2 --max-new-tokens 16
elif [ -n "$why" ]; then
  echo "=== dspark-vllm: skipped ($why)"
  SUMMARY+=("skipped dspark-vllm ($why)")
else
  step dspark-vllm 300 "$PY" scripts/dspark_vllm_gpu.py
fi

echo "=== summary ($([ "$DRY" -eq 1 ] && echo "dry run, CPU" || echo "GPU"); logs in $LOG)"
printf '%s\n' "${SUMMARY[@]}"
for name in precompute-overhead training-memory dspark-vllm; do
  [ -f "$LOG/$name.log" ] && grep -E "^(RATIO|peak device memory|bare HF forward|run_precompute|dflash|eagle3|dspark)" "$LOG/$name.log"
done
exit "$FAILED"
