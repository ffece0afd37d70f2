#!/usr/bin/env bash
# On a CUDA machine: the CUDA tests, then the training, factor and aggregator benchmarks on the GPU, and the fixed
# costs of aggregation there.
# Logs and tables go to ${OUT:-benchmarks/out}. Usage: bash benchmarks/gpu_checks.sh [tests|training|metrics|aggregators|overheads]...
set -uo pipefail
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
: "${MTLCORE_DATA_DIR:=/work/shared/data}"; export MTLCORE_DATA_DIR
PY=${PYTHON:-python3}
steps=${*:-tests training metrics aggregators overheads}
status=0
for step in $steps; do
  echo "== $step"
  case $step in
    tests) $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.log" ;;
    training) $PY benchmarks/bench_training.py --device cuda --steps 300 2>&1 | tee "$OUT/training_cuda.log" ;;
    metrics) $PY benchmarks/bench_metrics.py --device cuda --threads 4 --train-size 25000 --profile paper --repeats 3 --data-root "$MTLCORE_DATA_DIR" 2>&1 | tee "$OUT/metrics_cuda.log" ;;
    aggregators) $PY benchmarks/bench_aggregators.py --device cuda --threads 4 --settings ab --resnet-repeats 5 --data-root "$MTLCORE_DATA_DIR" 2>&1 | tee "$OUT/aggregators_cuda.log" ;;
    overheads) $PY benchmarks/bench_cuda_overheads.py 2>&1 | tee "$OUT/cuda_overheads.log" ;;
    *) echo "unknown step $step; use tests, training, metrics, aggregators or overheads"; exit 2 ;;
  esac || status=1  # pipefail: a failing test or benchmark fails the script, after the other steps ran
done
exit $status
