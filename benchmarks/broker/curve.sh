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
# Then the same three modes for durable jobs (job_bench, the C library, one
# worker with JOB_CAPACITY slots, SQLite store with synchronous=FULL on a
# fresh data dir): JOBS no-op jobs pipelined (window 256) for enqueue and
# end-to-end throughput and the SUBMIT -> ACCEPTED latency, then RTT_JOBS
# one at a time for the round trip.
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
JOBS=${JOBS:-10000}
RTT_JOBS=${RTT_JOBS:-300}
JOB_CAPACITY=${JOB_CAPACITY:-64}
J=$BUILD/benchmarks/jobs/job_bench
cmake --build "$BUILD" -j2 --target kelpied bench_client bench_worker job_bench >/dev/null

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
cp "$KEYS/client.pub" "$KEYS/admins" # job_bench e2e reads Stats
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

# -- durable jobs --------------------------------------------------------------

onejob() { # plain|curve|metrics -> prints job_bench's e2e and rtt JSON lines
    local mode=$1 pf pb pi data
    read -r pf pb pi < <(free_ports)
    data=$(mktemp -d)
    local args=(--frontend "tcp://127.0.0.1:$pf" --backend "tcp://127.0.0.1:$pb"
                --intake "tcp://127.0.0.1:$pi" --log-level warn --data-dir "$data")
    local cenv=() wenv=()
    if [ "$mode" = curve ]; then
        args+=(--key "$KEYS/broker" --allow-clients "$KEYS/clients" --allow-workers "$KEYS/workers"
               --allow-admins "$KEYS/admins")
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
    env "${wenv[@]}" "$J" worker "tcp://127.0.0.1:$pb" "$JOB_CAPACITY" jobs >/dev/null 2>&1 & PIDS+=($!)
    sleep 0.5
    env "${cenv[@]}" timeout 300 "$J" e2e "tcp://127.0.0.1:$pf" "$JOBS" 256 2>/dev/null || echo fail
    env "${cenv[@]}" timeout 300 "$J" rtt "tcp://127.0.0.1:$pf" "$RTT_JOBS" 2>/dev/null || echo fail
    for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    PIDS=()
    rm -rf "$data"
}

jfield() { sed -n "s/.*\"$2\": \([0-9.]*\).*/\1/p" <<<"$1" | head -1; }

echo
echo "Jobs, CURVE and metrics on vs off: $JOBS jobs (window 256) + $RTT_JOBS one at a time, x $REPS, load $(cut -d' ' -f1-3 /proc/loadavg)"
printf "%-8s %10s %6s %10s %6s %9s %9s %9s %9s\n" mode "e2e jobs/s" ratio "enq jobs/s" ratio \
    "acc p50" "acc p99" "rtt p50" "rtt p99"
declare -A E Q A50 A99 R50 R99
for _ in $(seq "$REPS"); do
    for mode in plain curve metrics; do
        out=$(onejob "$mode")
        e2e=$(jfield "$out" e2e_s); enq=$(jfield "$out" enqueue_s)
        E[$mode]+=" $($PY -c "print(f'{$JOBS / $e2e:.0f}' if '$e2e' else 0)")"
        Q[$mode]+=" $($PY -c "print(f'{$JOBS / $enq:.0f}' if '$enq' else 0)")"
        A50[$mode]+=" $(jfield "$out" accepted_p50_ms)"; A99[$mode]+=" $(jfield "$out" accepted_p99_ms)"
        R50[$mode]+=" $(jfield "$out" rtt_p50_ms)"; R99[$mode]+=" $(jfield "$out" rtt_p99_ms)"
    done
done
PE=$(echo "${E[plain]}" | median); PQ=$(echo "${Q[plain]}" | median)
for mode in plain curve metrics; do
    e=$(echo "${E[$mode]}" | median); q=$(echo "${Q[$mode]}" | median)
    printf "%-8s %10s %6s %10s %6s %9s %9s %9s %9s\n" "$mode" "$e" \
        "$($PY -c "print(f'{$e / $PE:.2f}' if $PE else '-')")" "$q" \
        "$($PY -c "print(f'{$q / $PQ:.2f}' if $PQ else '-')")" \
        "$(echo "${A50[$mode]}" | median)" "$(echo "${A99[$mode]}" | median)" \
        "$(echo "${R50[$mode]}" | median)" "$(echo "${R99[$mode]}" | median)"
done
