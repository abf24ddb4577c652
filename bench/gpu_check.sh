#!/usr/bin/env bash
# The device check (issue 18.5; docs/gpu.md). On a machine with a CUDA GPU, in under 8 minutes:
# the cuda-marked tests, harness PGD vs a bare PyTorch loop on pyautoattack's ResNet-18 (first 1,000
# CIFAR-10 test images, batch 500, >= 5 interleaved rounds), LAFEAT vs AutoAttack on the shared
# ResNet-2B, and the host-sync counts of every attack; writes bench/results/gpu.md and gpu.json.
# Without a CUDA device it refuses: one line, exit status 2.
#
#   bench/gpu_check.sh                     # everything (bench/bench_gpu.py --help for the options)
#   bench/gpu_check.sh --parts pgd,syncs
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
case " $* " in
  *" -h "*|*" --help "*) exec "$PY" bench/bench_gpu.py "$@" ;;
esac
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
  echo "gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); run it on a machine with a CUDA GPU" >&2
  exit 2
fi
# 480 s: the 8-minute limit, a backstop behind bench_gpu.py's own --budget-s (450 s by default)
exec timeout 480 "$PY" bench/bench_gpu.py "$@"
