"""Interceptors on the client (unary and streamed calls, async and sync) and
on the worker (around handlers of every kind), composed, with access to
metadata, deadline, method and outcome."""

import pytest

import kelpie
import kelpie.sync
from conftest import run, wait_served


class Recorder(kelpie.ClientInterceptor):
    """Logs what it sees before and after, tagged with its name."""

    def __init__(self, name, log):
        self.name = name
        self.log = log

    async def intercept_unary(self, details, proceed):
        self.log.append((self.name, "before", details.method, details.timeout))
        try:
            result = await proceed(details)
        except kelpie.RpcError as exc:
            self.log.append((self.name, "error", exc.code.name))
            raise
        self.log.append((self.name, "after", "ok"))
        return result

    def intercept_stream(self, details, proceed):
        self.log.append((self.name, details.kind, details.method))
        return proceed(details)


class Token(kelpie.ClientInterceptor):
    async def intercept_unary(self, details, proceed):
        details.add_metadata("token", "sesame")
        return await proceed(details)

    def intercept_stream(self, details, proceed):
        details.add_metadata("token", "sesame")
        return proceed(details)


class Retry(kelpie.ClientInterceptor):
    """Retries UNAVAILABLE, saying which attempt it is in the metadata."""

    def __init__(self, attempts):
        self.attempts = attempts

    async def intercept_unary(self, details, proceed):
        for attempt in range(1, self.attempts + 1):
            details.add_metadata("attempt", str(attempt))
            try:
                return await proceed(details)
            except kelpie.Unavailable:
                if attempt == self.attempts:
                    raise


def test_client_interceptors_compose_and_see_the_outcome(broker, procs, loop):
    procs.worker(broker, loop=loop)
    log = []

    async def main():
        async with kelpie.Client(broker.frontend, timeout=5,
                                 interceptors=[Recorder("outer", log), Recorder("inner", log),
                                               Token()]) as client:
            await wait_served(client)
            log.clear()
            reply, md = await client.call("echo", "Meta", b"hi", with_metadata=True)
            assert reply == b"hi"
            assert md["token"] == b"sesame"  # the interceptor's metadata reached the worker
            assert log == [("outer", "before", "Meta", 5), ("inner", "before", "Meta", 5),
                           ("inner", "after", "ok"), ("outer", "after", "ok")]
            log.clear()
            with pytest.raises(kelpie.NotFound):
                await client.call("echo", "Fail", b"notfound")
            assert log[-2:] == [("inner", "error", "NOT_FOUND"), ("outer", "error", "NOT_FOUND")]
            log.clear()
            chunks = [c async for c in client.stream("echo", "Count", b"3")]
            assert chunks == [b"0", b"1", b"2"]
            assert await client.stream_unary("echo", "Sum", [b"1", b"2"]) == b"3 2"
            assert [r async for r in client.stream_stream("echo", "Upper", [b"a"])] == [b"A"]
            assert log == [("outer", "server_stream", "Count"), ("inner", "server_stream", "Count"),
                           ("outer", "client_stream", "Sum"), ("inner", "client_stream", "Sum"),
                           ("outer", "bidi", "Upper"), ("inner", "bidi", "Upper")]
    run(main(), loop)


def test_retry_interceptor(broker, procs, tmp_path, loop):
    procs.worker(broker, loop=loop)

    async def main():
        async with kelpie.Client(broker.frontend, timeout=5,
                                 interceptors=[Retry(3)]) as client:
            await wait_served(client)
            # Flaky fails UNAVAILABLE unless this is attempt >= 3.
            assert await client.call("echo", "Flaky", b"3") == b"attempt 3"
            with pytest.raises(kelpie.Unavailable):
                await client.call("echo", "Flaky", b"4")
    run(main(), loop)


def test_sync_client_interceptors(broker, procs):
    procs.worker(broker)
    log = []

    class SyncRecorder:
        def intercept_unary(self, details, proceed):
            log.append(("before", details.method))
            result = proceed(details)
            log.append(("after", details.method))
            return result

        def intercept_stream(self, details, proceed):
            details.add_metadata("token", "sesame")
            log.append((details.kind, details.method))
            return proceed(details)

    with kelpie.sync.Client(broker.frontend, timeout=5,
                            interceptors=[SyncRecorder()]) as client:
        client.wait_for_service("echo")
        log.clear()
        assert client.call("echo", "Echo", b"x") == b"x"
        assert log == [("before", "Echo"), ("after", "Echo")]
        log.clear()
        assert list(client.stream("echo", "Count", b"2")) == [b"0", b"1"]
        assert client.stream_unary("echo", "Sum", [b"5"]) == b"5 1"
        assert list(client.stream_stream("echo", "Upper", [b"q"])) == [b"Q"]
        assert log == [("server_stream", "Count"), ("client_stream", "Sum"), ("bidi", "Upper")]


def test_worker_interceptors_around_every_handler(broker, procs, loop):
    procs.worker(broker, loop=loop, target="intercepted_app:worker")

    async def main():
        async with kelpie.Client(broker.frontend, timeout=10) as bare, \
                kelpie.Client(broker.frontend, timeout=10, interceptors=[Token()]) as client:
            await wait_served(client, "ic", "Echo")
            # Refused before the handler runs, on every kind of handler.
            for method in ("Echo", "Thread", "Process"):
                with pytest.raises(kelpie.RpcError) as err:
                    await bare.call("ic", method, b"2")
                assert err.value.code == kelpie.StatusCode.UNAUTHENTICATED
            with pytest.raises(kelpie.RpcError) as err:
                [c async for c in bare.stream("ic", "Count", b"2")]
            assert err.value.code == kelpie.StatusCode.UNAUTHENTICATED
            # Around the loop, the thread pool and the process pool alike.
            for method, payload, want in (("Echo", b"e", b"e!"), ("Thread", b"t", b"T!"),
                                          ("Process", b"7", b"49!")):
                reply, md = await client.call("ic", method, payload, with_metadata=True)
                assert reply == want
                assert (md["method"], md["outcome"], md["has-deadline"]) == (
                    method.encode(), b"ok", b"1")
            with pytest.raises(kelpie.NotFound) as err:
                await client.call("ic", "Fail")
            assert err.value.metadata["outcome"] == b"NOT_FOUND"
            stream = client.stream("ic", "Count", b"3")
            assert [c async for c in stream] == [b"first", b"0", b"1", b"2"]
            assert stream.metadata["chunks"] == b"3"
            call = client.stream_unary("ic", "Sum", [b"1", b"2", b"3"])
            assert await call == b"6!"
            assert call.metadata["outcome"] == b"ok"
            assert [r async for r in client.stream_stream("ic", "Upper", [b"a", b"b"])] == \
                [b"first", b"A", b"B"]
    run(main(), loop)
