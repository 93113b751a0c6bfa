"""Plots benchmarks/broker/run.sh results: throughput and latency, Kelpie
beside the bare zmq_proxy hop. Run by run.sh with Debian's /usr/bin/python3
(python3-matplotlib).

    plot.py ROWS_FILE OUT_PNG

ROWS_FILE has one line per case:
size depth kelpie_rps kelpie_p50 kelpie_p99 bare_rps bare_p50 bare_p99 ratio kelpie_cpu bare_cpu
"""
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(rows_file, out_png):
    rows = [line.split() for line in open(rows_file) if line.strip()]
    labels = [f"{r[0]} B\n{r[1]} in flight" for r in rows]
    x = list(range(len(rows)))
    fig, (thr, lat, cpu) = plt.subplots(1, 3, figsize=(14, 3.8))

    kelpie = [float(r[2]) / 1000 for r in rows]
    bare = [float(r[5]) / 1000 for r in rows]
    thr.bar([i - 0.2 for i in x], bare, 0.4, label="bare zmq_proxy hop", color="#bbbbbb")
    thr.bar([i + 0.2 for i in x], kelpie, 0.4, label="kelpied", color="#2a7f62")
    for i, r in enumerate(rows):
        thr.text(i + 0.2, kelpie[i], r[8], ha="center", va="bottom", fontsize=8)
    thr.set_xticks(x)
    thr.set_xticklabels(labels, fontsize=8)
    thr.set_ylabel("thousand requests/s")
    thr.set_title("throughput (label: Kelpie / bare)", fontsize=9)
    thr.legend(fontsize=8)

    series = (
        (7, "bare p99", "#888888", -0.2),
        (6, "bare p50", "#cccccc", -0.2),
        (4, "kelpied p99", "#2a7f62", 0.2),
        (3, "kelpied p50", "#7fc8a9", 0.2),
    )
    for col, name, color, off in series:
        lat.bar([i + off for i in x], [float(r[col]) for r in rows], 0.4, label=name, color=color)
    lat.set_xticks(x)
    lat.set_xticklabels(labels, fontsize=8)
    lat.set_ylabel("latency, µs (log)")
    lat.set_yscale("log")
    lat.set_title("latency: p50 in front of p99", fontsize=9)
    lat.legend(fontsize=7)

    cpu.bar([i - 0.2 for i in x], [float(r[10]) for r in rows], 0.4, label="bare", color="#bbbbbb")
    cpu.bar([i + 0.2 for i in x], [float(r[9]) for r in rows], 0.4, label="kelpied", color="#2a7f62")
    cpu.set_xticks(x)
    cpu.set_xticklabels(labels, fontsize=8)
    cpu.set_ylabel("CPU µs per request (log)")
    cpu.set_yscale("log")
    cpu.set_title("CPU time per request, client + hop + server", fontsize=9)
    cpu.legend(fontsize=8)

    fig.suptitle("kelpied vs a bare zmq_proxy hop, one run on a 2-core machine", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
