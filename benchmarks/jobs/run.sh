#!/usr/bin/env bash
# benchmarks/jobs/run.sh: the job store's durable write rate.
#
#   benchmarks/jobs/run.sh    (from anywhere; env: BUILD, DIR, SECONDS_PER_CASE)
#
# Runs store_bench on DIR (default: a scratch directory under the build tree,
# i.e. on the disk the build lives on; never a tmpfs, where fsync is free)
# and prints its table. The scratch directory is removed on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BUILD=${BUILD:-$ROOT/build}
SECS=${SECONDS_PER_CASE:-3}
if [ ! -f "$BUILD/CMakeCache.txt" ]; then
    cmake -S "$ROOT" -B "$BUILD" -DPython3_EXECUTABLE=/usr/bin/python3 >/dev/null
fi
cmake --build "$BUILD" -j2 --target store_bench >/dev/null
DIR=${DIR:-$(mktemp -d "$BUILD/store-bench.XXXXXX")}
trap 'rm -rf "$DIR"' EXIT
echo "store_bench on $(df -T "$DIR" | awk 'NR==2 {print $2 " (" $1 ")"}'), ${SECS}s per case"
"$BUILD/benchmarks/jobs/store_bench" "$DIR" "$SECS"
