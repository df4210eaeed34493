#!/usr/bin/env bash
# GPU checks of vdot_ext, one table (benchmarks/gpu/run_checks.py):
#   - Sinkhorn backends (Triton, blocked, sdpa, flash-sinkhorn if installed) vs float64 at the
#     paper setting (21 x 1560^2 x 16, OTDLoss's default eps, 60 iterations) and at 32760^2, D 64;
#   - a stage-2 train_step of the 1.3B VDOTDistiller (bf16, gradient checkpointing, ZeRO-2, one GPU)
#     next to plan_memory's estimate;
#   - 4-step inference at 81x480x832 on the 1.3B size.
# At most 8 minutes on one H100/H200 (the checks share a 470 s budget; a hard stop at 480 s).
# On a CPU machine, every check at tiny size, the same table:
#   benchmarks/gpu/run_checks.sh --dry-run
# Record a GPU run in benchmarks/RESULTS.md:
#   benchmarks/gpu/run_checks.sh --markdown /tmp/gpu_checks.md
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
for arg in "$@"; do
  case "$arg" in
    --dry-run|--cpu) exec python benchmarks/gpu/run_checks.py "$@" ;;
  esac
done
exec timeout --signal=TERM --kill-after=10 480 python benchmarks/gpu/run_checks.py "$@"
