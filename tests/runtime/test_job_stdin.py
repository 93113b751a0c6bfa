"""``ctx.stdin`` of job handlers in the thread pool and the process pool
(protocol.md §11.7), through a real kelpied and a real worker process: the
input in order, its end, the pacing of unread input at 1 MiB, and a
cancel or the job's time limit reaching a handler that waits for input."""

import asyncio
import json

import pytest

import kelpie
from conftest import pid_alive, run, wait_for, wait_served

QUEUES = {"thread": "rt.stdin.thread", "process": "rt.stdin.proc"}


@pytest.fixture(params=["thread", "process"])
def executor(request):
    return request.param


async def started(tmp_path, tag):
    path = tmp_path / f"{tag}.pid"
    await wait_for(lambda: path.exists() and path.read_text(), 10, f"job {tag} started")
    return int(path.read_text())


async def echo(client, queue, tmp_path, tag, data):
    job = await client.submit(queue, json.dumps({"tag": tag}).encode())
    await started(tmp_path, tag)
    await job.write_stdin(data)
    await job.close_stdin()
    assert await job.result(timeout=20) == data


def test_job_stdin_in_threads_and_processes(broker, procs, tmp_path, loop, executor):
    procs.worker(broker, RT_DIR=tmp_path, RT_POOL=1, RT_PROCESSES=1, RT_JOBS=1,
                 loop=loop)
    queue = QUEUES[executor]

    async def main():
        async with kelpie.Client(broker.frontend, timeout=20) as client:
            await wait_served(client)
            # Echo: pieces in order (the last one goes as three INPUTs), then the end.
            job = await client.submit(queue, json.dumps({"tag": "echo"}).encode())
            await started(tmp_path, "echo")
            pieces = [b"one", "two\n", b"three" * 30000]
            for piece in pieces:
                await job.write_stdin(piece)
            await job.close_stdin()
            assert await job.result(timeout=20) == b"one" + b"two\n" + b"three" * 30000

            # Unread input is paced: the worker takes 1 MiB (four pieces) its
            # handler has not read, the writer waits for the rest until the
            # handler reads, and nothing is dropped (protocol.md §11.7).
            job = await client.submit(queue, json.dumps(
                {"tag": "cap", "hold": True, "report": True}).encode())
            await started(tmp_path, "cap")
            piece = b"z" * (256 * 1024)

            async def write_all():
                for _ in range(6):
                    await job.write_stdin(piece)
                await job.close_stdin()
            writing = asyncio.ensure_future(write_all())
            await asyncio.sleep(1.0)
            assert not writing.done(), "the writes did not wait for the handler"
            (tmp_path / "cap.go").write_text("go")
            await asyncio.wait_for(writing, 20)
            report = json.loads(await job.result(timeout=20))
            assert report["received"] == report["read"] == 6 * len(piece), report
            assert report["dropped"] == 0, report
            assert report["closed"] is True, report

            # A cancel reaches a handler waiting for input.
            job = await client.submit(queue, json.dumps({"tag": "cancel"}).encode(),
                                      max_attempts=1)
            pid = await started(tmp_path, "cancel")
            await job.write_stdin(b"partial")
            await job.cancel()
            with pytest.raises(kelpie.JobCancelled):
                await job.result(timeout=10)
            if executor == "thread":  # woken in read(), not left blocked
                assert (tmp_path / "cancel.woken").exists()
            else:  # the child got SIGTERM (it may not outlive its job)
                await wait_for(lambda: not pid_alive(pid), 5, "the cancelled child ended")

            # A replacement child (process) is up once a job has run in it.
            await echo(client, queue, tmp_path, "between", b"up")

            # The job's time limit reaches it too.
            job = await client.submit(queue, json.dumps({"tag": "late"}).encode(),
                                      max_attempts=1, timeout=0.8)
            pid = await started(tmp_path, "late")
            with pytest.raises(kelpie.JobFailed) as err:
                await job.result(timeout=10)
            assert "time limit" in err.value.history[-1].message, err.value.history
            if executor == "thread":
                assert (tmp_path / "late.woken").exists()
            else:
                await wait_for(lambda: not pid_alive(pid), 5, "the timed-out child ended")

            # The worker (and its pool) serves the next job.
            await echo(client, queue, tmp_path, "again", b"still here")
    run(main(), timeout=90)
