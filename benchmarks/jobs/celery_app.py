"""The Celery side of benchmarks/jobs/bench.py: one app on the benchmark's
own Redis (BENCH_REDIS_URL; queue in db 0, results in db 1) and the three
kinds of job every system runs. Celery's defaults otherwise (prefetch
multiplier 4, early ack, JSON), as a user who installs it gets them."""

import os
import time

from celery import Celery

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379")
app = Celery("bench", broker=URL + "/0", backend=URL + "/1")
app.conf.update(result_expires=3600, worker_hijack_root_logger=False)


@app.task
def noop():
    return None


@app.task
def fast(sent):
    """The job's latency from its submission (the producer's time.time())."""
    return time.time() - sent


@app.task
def slow(seconds):
    time.sleep(seconds)
