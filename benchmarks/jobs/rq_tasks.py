"""The RQ side of benchmarks/jobs/bench.py: the three kinds of job every
system runs (RQ imports them by module path in its work horse)."""

import time


def noop():
    return None


def fast(sent):
    """The job's latency from its submission (the producer's time.time())."""
    return time.time() - sent


def slow(seconds):
    time.sleep(seconds)
