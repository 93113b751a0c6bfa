#!/usr/bin/env bash
# benchmarks/broker/curve.sh: what CURVE and the metrics endpoint cost, in one run.
#
#   benchmarks/broker/curve.sh   (env: BUILD, SECONDS_PER_CASE, REPS)
#
# bench_client -> kelpied -> bench_worker (the C library), 64 B and 1 KiB
# payloads, 1 and 100 calls in flight, with plain text and with CURVE
# (kelpied --key and allow-lists; client and worker keys from kelpie keygen,
# which also puts the per-message allow-list check on the broker's path), and
# with plain text and --http (the loop renders the metrics snapshot once a
# second while a scraper reads /metrics every second).
# The cases alternate so load drift hits all alike; the median of REPS runs
# is printed, with each throughput as a fraction of plain.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BUILD=${BUILD:-$ROOT/build}
SECS=${SECONDS_PER_CASE:-3}
REPS=${REPS:-3}
PY=/usr/bin/python3
KELPIED=$BUILD/broker/kelpied
B=$BUILD/benchmarks/broker
cmake --build "$BUILD" -j2 --target kelpied bench_client bench_worker >/dev/null

KEYS=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill -KILL "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$KEYS"
}
trap cleanup EXIT INT TERM
for k in broker client worker; do
    PYTHONPATH=$BUILD/python $PY -m kelpie keygen "$KEYS/$k" >/dev/null
done
cp "$KEYS/client.pub" "$KEYS/clients"
cp "$KEYS/worker.pub" "$KEYS/workers"

free_ports() {
    $PY -c "
import socket
s = [socket.socket() for _ in range(3)]
for x in s: x.bind(('127.0.0.1', 0))
print(' '.join(str(x.getsockname()[1]) for x in s))"
}

one() { # plain|curve|metrics size depth -> prints the client's line
    local mode=$1 size=$2 depth=$3 pf pb pi
    read -r pf pb pi < <(free_ports)
    local args=(--frontend "tcp://127.0.0.1:$pf" --backend "tcp://127.0.0.1:$pb"
                --intake "tcp://127.0.0.1:$pi" --log-level warn)
    local cenv=() wenv=()
    if [ "$mode" = curve ]; then
        args+=(--key "$KEYS/broker" --allow-clients "$KEYS/clients" --allow-workers "$KEYS/workers")
        cenv=(KELPIE_KEY="$KEYS/client" KELPIE_SERVER_KEY="$KEYS/broker.pub")
        wenv=(KELPIE_KEY="$KEYS/worker" KELPIE_SERVER_KEY="$KEYS/broker.pub")
    fi
    local scraper=""
    if [ "$mode" = metrics ]; then
        local ph
        ph=$(free_ports | cut -d' ' -f1)
        args+=(--http "127.0.0.1:$ph")
        scraper="while sleep 1; do curl -s -o /dev/null http://127.0.0.1:$ph/metrics; done"
    fi
    "$KELPIED" "${args[@]}" >/dev/null 2>&1 & PIDS+=($!)
    if [ -n "$scraper" ]; then bash -c "$scraper" & PIDS+=($!); fi
    sleep 0.3
    env "${wenv[@]}" "$B/bench_worker" kelpie "tcp://127.0.0.1:$pb" 256 >/dev/null 2>&1 & PIDS+=($!)
    sleep 0.5
    env "${cenv[@]}" timeout $((SECS + 30)) "$B/bench_client" kelpie "tcp://127.0.0.1:$pf" \
        "$size" "$depth" "$SECS" 2>/dev/null || echo fail
    for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    PIDS=()
}

field() { sed -n "s/.*$2=\([0-9.]*\).*/\1/p" <<<"$1"; }
median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

echo "CURVE on vs off: ${SECS}s per case x $REPS, load $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) cores"
printf "%-6s %-6s %11s %11s %6s %11s %6s %9s %9s %9s\n" size depth "plain rps" "curve rps" ratio \
    "metrics rps" ratio "plain p50" "curve p50" "curve p99"
for size in 64 1024; do
    for depth in 1 100; do
        pr=(); cr=(); mr=(); p50=(); c50=(); c99=()
        for _ in $(seq "$REPS"); do
            l=$(one plain "$size" "$depth"); pr+=("$(field "$l" rps)"); p50+=("$(field "$l" p50_us)")
            l=$(one curve "$size" "$depth"); cr+=("$(field "$l" rps)"); c50+=("$(field "$l" p50_us)"); c99+=("$(field "$l" p99_us)")
            l=$(one metrics "$size" "$depth"); mr+=("$(field "$l" rps)")
        done
        P=$(echo "${pr[*]}" | median); C=$(echo "${cr[*]}" | median); M=$(echo "${mr[*]}" | median)
        RC=$($PY -c "print(f'{$C / $P:.2f}' if $P else '-')")
        RM=$($PY -c "print(f'{$M / $P:.2f}' if $P else '-')")
        printf "%-6s %-6s %11s %11s %6s %11s %6s %9s %9s %9s\n" "$size" "$depth" "$P" "$C" "$RC" \
            "$M" "$RM" "$(echo "${p50[*]}" | median)" "$(echo "${c50[*]}" | median)" \
            "$(echo "${c99[*]}" | median)"
    done
done
