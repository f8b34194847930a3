#!/bin/bash
# Run tests/test_load.py N times in a row (default 10) while a CPU hog spins on every core.
# Usage: bash benchmarks/load_test_with_cpu_hog.sh [N]; prints one line per run and "passed X of N".
cd "$(dirname "$0")/.." || exit 1
runs=${1:-10}
hogs=()
for _ in $(seq 1 "$(nproc)"); do python3 -c 'while 1: pass' & hogs+=($!); done
trap 'kill "${hogs[@]}" 2>/dev/null' EXIT
passed=0
for i in $(seq 1 "$runs"); do
  start=$(date +%s)
  log=$(mktemp)
  if .venv/bin/python -m pytest tests/test_load.py -q -p no:cacheprovider >"$log" 2>&1; then passed=$((passed + 1)); result=ok; else result=FAILED; fi
  echo "run $i: $result: $(tail -1 "$log") ($(( $(date +%s) - start )) s, load $(cut -d' ' -f1 /proc/loadavg))"
  [ "$result" = ok ] && rm -f "$log" || echo "  log kept: $log"
done
echo "passed $passed of $runs"
[ "$passed" = "$runs" ]
