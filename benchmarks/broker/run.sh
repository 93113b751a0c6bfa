#!/usr/bin/env bash
# benchmarks/broker/run.sh: the whole broker benchmark in one command.
#
#   benchmarks/broker/run.sh    (from anywhere; env: BUILD, SECONDS_PER_CASE, REPS, CONNS)
#
# 1. Throughput and latency: bench_client -> kelpied -> bench_worker (kelpie),
#    and the same load through a bare zmq_proxy hop (bench_proxy, bare echo),
#    64 B and 1 KiB payloads, 1 and 100 calls in flight. Kelpie's figure is
#    printed beside the bare hop's as a ratio.
# 2. Connection capacity: CONNS idle connections (half workers, half clients)
#    against one kelpied, with its RSS growth per connection.
#
# Prints a table, writes benchmarks/results/broker.md and docs/img/broker.png.
# Every process it starts is killed on exit; every case is bounded by timeout.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BUILD=${BUILD:-$ROOT/build}
SECS=${SECONDS_PER_CASE:-3}
REPS=${REPS:-3}
CONNS=${CONNS:-10000}
PY=/usr/bin/python3
RESULTS=$ROOT/benchmarks/results
mkdir -p "$RESULTS" "$ROOT/docs/img"

# --- build ------------------------------------------------------------------
if [ ! -f "$BUILD/CMakeCache.txt" ]; then
    cmake -S "$ROOT" -B "$BUILD" -DPython3_EXECUTABLE=$PY >/dev/null
fi
KELPIED=$BUILD/broker/kelpied
B=$BUILD/benchmarks/broker
if ! cmake --build "$BUILD" -j2 --target kelpied bench_client bench_worker bench_proxy bench_conns \
    >"$RESULTS/build.log" 2>&1; then
    # A half-edited tree elsewhere can break the configure step; binaries
    # built before are still good enough to measure with.
    for f in "$KELPIED" "$B/bench_client" "$B/bench_worker" "$B/bench_proxy" "$B/bench_conns"; do
        [ -x "$f" ] || { echo "build failed, see $RESULTS/build.log" >&2; exit 1; }
    done
    echo "warning: build failed (see $RESULTS/build.log); using the binaries already built" >&2
fi

# --- process bookkeeping ----------------------------------------------------
PIDS=()
cleanup() {
    for p in "${PIDS[@]:-}"; do
        [ -n "$p" ] && kill -KILL "$p" 2>/dev/null || true
    done
    wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

stop_all() {
    for p in "${PIDS[@]:-}"; do
        [ -n "$p" ] && kill -TERM "$p" 2>/dev/null || true
    done
    sleep 0.3
    for p in "${PIDS[@]:-}"; do
        [ -n "$p" ] && kill -KILL "$p" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    PIDS=()
}

free_ports() { # prints N free TCP ports on 127.0.0.1
    $PY - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# Runs bench_client with a time bound; prints its result line or "fail".
# The *_case functions leave that line in RESULT.
client() { # mode endpoint size depth
    timeout $((SECS + 30)) "$B/bench_client" "$1" "$2" "$3" "$4" "$SECS" 2>/dev/null || echo fail
}

# Runs a case until it yields a result (at most 3 tries): a port probed free
# can be taken by someone else before our process binds it.
retry() { # case size depth
    for _ in 1 2 3; do
        "$@"
        [ "$RESULT" != fail ] && return 0
    done
}

# CPU time (user+system, clock ticks) a process has used so far.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
HZ=$(getconf CLK_TCK)

# Runs the client and appends cpu_req_us: CPU time of all three processes
# (client, hop, echo server) per request. Unlike requests/s this hardly
# depends on what else the machine is doing.
measured() { # hop_pid worker_pid mode endpoint size depth
    local h0 w0 h1 w1 line cpu all
    h0=$(ticks "$1"); w0=$(ticks "$2")
    line=$(client "$3" "$4" "$5" "$6")
    h1=$(ticks "$1"); w1=$(ticks "$2")
    cpu=$(field "$line" cpu_us); all=$(field "$line" all)
    if [ -n "$cpu" ] && [ -n "$all" ] && [ "$all" != 0 ]; then
        line="$line $($PY -c "
c, h, w, n = $cpu, ($h1 - $h0) * 1e6 / $HZ, ($w1 - $w0) * 1e6 / $HZ, $all
print(f'cpu_req_us={(c + h + w) / n:.2f} cpu_client={c / n:.2f} cpu_hop={h / n:.2f} cpu_server={w / n:.2f}')")"
    fi
    echo "$line"
}

bare_case() { # size depth
    read -r pf pb < <(free_ports 2)
    "$B/bench_proxy" "tcp://127.0.0.1:$pf" "tcp://127.0.0.1:$pb" >/dev/null & PIDS+=($!)
    local hop=$!
    "$B/bench_worker" bare "tcp://127.0.0.1:$pb" >/dev/null & PIDS+=($!)
    local worker=$!
    sleep 0.3
    RESULT=$(measured $hop $worker bare "tcp://127.0.0.1:$pf" "$1" "$2")
    stop_all
}

kelpie_case() { # size depth
    read -r pf pb pi < <(free_ports 3)
    "$KELPIED" --frontend "tcp://127.0.0.1:$pf" --backend "tcp://127.0.0.1:$pb" \
        --intake "tcp://127.0.0.1:$pi" --log-level warn >/dev/null 2>&1 & PIDS+=($!)
    local hop=$!
    sleep 0.3
    "$B/bench_worker" kelpie "tcp://127.0.0.1:$pb" 256 >/dev/null & PIDS+=($!)
    local worker=$!
    sleep 0.5
    RESULT=$(measured $hop $worker kelpie "tcp://127.0.0.1:$pf" "$1" "$2")
    stop_all
}

field() { # line key
    sed -n "s/.*$2=\([0-9.]*\).*/\1/p" <<<"$1"
}

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
echo "kelpie broker benchmark: ${SECS}s per case x $REPS, load average $LOAD_BEFORE, $(nproc) cores"
ROWS=()
RUNS=()
SPLIT=()
printf '%-6s %-6s | %12s %9s %9s | %12s %9s %9s | %6s | %13s\n' size depth \
    "kelpie req/s" "p50 us" "p99 us" "bare req/s" "p50 us" "p99 us" ratio "CPU us/req k b"
# Each case runs REPS times, Kelpie and bare interleaved so that a burst of
# load from elsewhere hits both; the table shows the median of each figure.
median() { # numbers...
    printf '%s\n' "$@" | grep -E '^[0-9.]+$' | sort -g | awk '{a[NR]=$1} END {if (NR) print a[int((NR+1)/2)]}'
}
for size in 64 1024; do
    for depth in 1 100; do
        KR=(); K50=(); K99=(); BR=(); B50=(); B99=(); KC=(); BC=(); KS=(); BS=()
        for _ in $(seq "$REPS"); do
            retry kelpie_case $size $depth
            KR+=("$(field "$RESULT" rps)"); K50+=("$(field "$RESULT" p50_us)")
            K99+=("$(field "$RESULT" p99_us)"); KC+=("$(field "$RESULT" cpu_req_us)")
            KS+=("$(field "$RESULT" cpu_client) $(field "$RESULT" cpu_hop) $(field "$RESULT" cpu_server)")
            retry bare_case $size $depth
            BR+=("$(field "$RESULT" rps)"); B50+=("$(field "$RESULT" p50_us)")
            B99+=("$(field "$RESULT" p99_us)"); BC+=("$(field "$RESULT" cpu_req_us)")
            BS+=("$(field "$RESULT" cpu_client) $(field "$RESULT" cpu_hop) $(field "$RESULT" cpu_server)")
        done
        kr=$(median "${KR[@]}"); k50=$(median "${K50[@]}"); k99=$(median "${K99[@]}")
        br=$(median "${BR[@]}"); b50=$(median "${B50[@]}"); b99=$(median "${B99[@]}")
        kc=$(median "${KC[@]}"); bc=$(median "${BC[@]}")
        ratio=$($PY -c "print(f'{float(\"${kr:-0}\")/float(\"${br:-0}\"):.2f}' if '${br}' and float('${br}') else 'n/a')")
        printf '%-6s %-6s | %12s %9s %9s | %12s %9s %9s | %6s | %6s %6s  (req/s runs: kelpie %s; bare %s)\n' \
            $size $depth "${kr:-fail}" "${k50:--}" "${k99:--}" "${br:-fail}" "${b50:--}" \
            "${b99:--}" "$ratio" "${kc:--}" "${bc:--}" "${KR[*]}" "${BR[*]}"
        ROWS+=("$size $depth ${kr:-0} ${k50:-0} ${k99:-0} ${br:-0} ${b50:-0} ${b99:-0} $ratio ${kc:-0} ${bc:-0}")
        RUNS+=("| $size B | $depth | ${KR[*]} | ${BR[*]} |")
        SPLIT+=("| $size B | $depth | $(printf '%s; ' "${KS[@]}") | $(printf '%s; ' "${BS[@]}") |")
    done
done

# --- connection capacity ----------------------------------------------------
read -r pf pb pi < <(free_ports 3)
CONN_LINE=fail
(
    ulimit -n "$(ulimit -Hn)"
    exec "$KELPIED" --frontend "tcp://127.0.0.1:$pf" --backend "tcp://127.0.0.1:$pb" \
        --intake "tcp://127.0.0.1:$pi" --heartbeat-ms 600000 --log-level warn >/dev/null 2>&1
) & KPID=$!
PIDS+=($KPID)
sleep 0.5
HALF=$((CONNS / 2))
CONN_LINE=$(
    ulimit -n "$(ulimit -Hn)"
    timeout 120 "$B/bench_conns" "$KPID" "tcp://127.0.0.1:$pf" "tcp://127.0.0.1:$pb" \
        $HALF $((CONNS - HALF)) 4 2>&1 | tail -1
) || true
stop_all
echo "connections: $CONN_LINE"
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# --- report -----------------------------------------------------------------
{
    echo "# Broker benchmark results"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, load average before $LOAD_BEFORE," \
        "after $LOAD_AFTER; each case ${SECS} s, run $REPS times interleaved with the bare hop;" \
        "medians shown. Command: \`benchmarks/broker/run.sh\`."
    echo
    echo "| payload | in flight | Kelpie req/s | p50 µs | p99 µs | bare zmq_proxy req/s | p50 µs | p99 µs | Kelpie / bare | CPU µs/req Kelpie | CPU µs/req bare |"
    echo "|--------:|----------:|-------------:|-------:|-------:|---------------------:|-------:|-------:|--------------:|------------------:|----------------:|"
    for row in "${ROWS[@]}"; do
        read -r s d kr k50 k99 br b50 b99 ratio kc bc <<<"$row"
        echo "| $s B | $d | $kr | $k50 | $k99 | $br | $b50 | $b99 | $ratio | $kc | $bc |"
    done
    echo
    echo "CPU µs/req: user+system time of all three processes (client, hop, echo server)"
    echo "divided by the requests they carried. It moves with batching (a busier machine"
    echo "batches more), but the Kelpie/bare CPU ratio is steadier than the throughput ratio."
    echo
    echo "Every run's requests/s (Kelpie; bare):"
    echo
    echo "| payload | in flight | Kelpie runs | bare runs |"
    echo "|--------:|----------:|------------:|----------:|"
    printf '%s\n' "${RUNS[@]}"
    echo
    echo "CPU µs per request by process, each run (client hop server):"
    echo
    echo "| payload | in flight | Kelpie: client kelpied worker | bare: client zmq_proxy echo |"
    echo "|--------:|----------:|------------------------------:|----------------------------:|"
    printf '%s\n' "${SPLIT[@]}"
    echo
    echo "Connection capacity ($CONNS requested: half idle workers, half idle clients):"
    echo
    echo "| workers | clients | broker RSS before | RSS after | RSS growth per connection | time to open |"
    echo "|--------:|--------:|------------------:|----------:|--------------------------:|-------------:|"
    echo "| $(field "$CONN_LINE" workers) | $(field "$CONN_LINE" clients) |" \
        "$(field "$CONN_LINE" rss_before_kb) KiB | $(field "$CONN_LINE" rss_after_kb) KiB |" \
        "$(field "$CONN_LINE" per_conn_bytes) B | $(field "$CONN_LINE" open_s) s |"
    echo
    echo "Raw: \`$CONN_LINE\`"
} >"$RESULTS/broker.md"

printf '%s\n' "${ROWS[@]}" >"$RESULTS/broker.rows"
$PY "$ROOT/benchmarks/broker/plot.py" "$RESULTS/broker.rows" "$ROOT/docs/img/broker.png"
echo "wrote $RESULTS/broker.md and docs/img/broker.png"
