"""Client-streamed calls: ``stream_unary`` and ``stream_stream``.

A call whose request is a stream (docs/protocol.md §5.6) sends a REQUEST
with the CLIENT_STREAM flag, then each request as a CHUNK (``sequence`` 0,
1, …) on the same request id, and END when the caller is done writing. The
caller may have :data:`kelpie._wire.INPUT_WINDOW` CHUNKs unacknowledged;
the worker returns window with CREDIT(CLIENT_STREAM) as its handler reads,
so a slow handler makes :meth:`StreamStreamCall.write` wait and nothing is
buffered without bound anywhere. The answer is one REPLY (stream-unary) or
CHUNKs and END under the reply window of a server stream (stream-stream).

:class:`DuplexCore` is the shared decision part (``kelpie._calls.StreamCore``
plus the input side); the async call objects here and the blocking ones in
:mod:`kelpie._sync_streaming` add their I/O and waiting. grpc.aio's shapes:

    call = client.stream_stream("chat", "Talk")
    await call.write(b"hi")
    await call.done_writing()
    async for reply in call: ...

    reply = await client.stream_unary("sum", "Add", requests)  # async or plain iterable
"""

from __future__ import annotations

import asyncio
from itertools import islice as _islice
from operator import length_hint as _length_hint

from . import _calls, _compression, _wire, _zmq
from ._calls import payload as _payload
from .errors import ResourceExhausted, RpcError, Unavailable

__all__ = ["DuplexCore", "AsyncDuplex", "SyncDuplex", "StreamStreamCall", "StreamUnaryCall",
           "BlockingStreamStreamCall"]

_CREDIT = _wire.CREDIT
_REPLY = _wire.REPLY
_CLIENT_STREAM = _wire.CLIENT_STREAM
# A request this large goes in a CHUNK of its own: batching pays for small
# messages (one send, one header, one wake-up for many), while joining large
# ones only copies bytes (protocol.md §5.8).
BATCH_ALONE = 64 * 1024
# A batch ends before it would hold more than this many bytes of messages.
# Larger batches measured slower per message, not faster (one bidi stream of
# 1 KiB messages: ~2x the CPU per message in the client and the worker with
# a whole 256-message window in one batch): each hop stores and forwards the
# whole batch before the next can start on it, and buffers this large
# leave the allocator's pools.
BATCH_BYTES = 128 * 1024


class DuplexCore:
    """A client-streamed call's decisions, mixed in before a client's stream
    state class (a ``kelpie._calls.StreamCore``): the input window, the next
    input sequence, and the one REPLY of a stream-unary call. The state
    class declares the slots (``server_streaming``, ``input_window``,
    ``input_seq``, ``writes_done``, ``reply``)."""

    __slots__ = ()

    def _init_input(self, server_streaming):
        self.server_streaming = server_streaming
        self.input_window = _wire.INPUT_WINDOW
        self.input_seq = 0
        self.writes_done = False
        self.reply = None
        # protocol.md §5.8: the most requests per CHUNK the worker (and the
        # broker) read, from their CREDIT; 0 until one says so.
        self.batch_max = 0

    def request_flags(self):
        flags = _CLIENT_STREAM
        if self.server_streaming:
            flags |= _wire.STREAM
        return flags

    def deliver(self, kind, header, frames):
        if kind != _CREDIT and self.client._zip.setting:
            self.client._zip.learn(self.service, header)
        if kind == _CREDIT:
            if header.flags & _CLIENT_STREAM:
                self.input_window += header.credits
                self.batch_max = header.batch_max
                self._wake()
            return
        if kind == _REPLY and not self.server_streaming:
            self._forget()
            data = _payload(frames)
            if header.flags & _wire.COMPRESSED:
                try:
                    data = _compression.decompress(data)
                except RpcError as exc:
                    self.error = exc
            self.reply = data
            self.trailing = dict(header.metadata)
            self.finished = True
            self._ended()
            self._wake()
            return
        _calls.StreamCore.deliver(self, kind, header, frames)

    def check_write(self):
        """Raise if nothing may be written any more."""
        if self.writes_done:
            raise RuntimeError("write() after done_writing()")
        if self.finished:
            if self.error is not None and not isinstance(self.error, asyncio.CancelledError):
                raise self.error
            raise RuntimeError("the call has ended; nothing more can be written")

    def chunk_frames(self, message, max_message_size):
        """The next CHUNK as (header, payload), size-checked, compressed when
        the client compresses and the service's workers read zstd; takes window."""
        zip_ = self.client._zip
        flags = 0
        if zip_.setting:
            message, flags = zip_.request(self.service, message)
        header = _wire.chunk(self.rid, self.input_seq, flags)
        too_big = _wire.oversize("request chunk", header, message, max_message_size)
        if too_big is not None:
            raise ResourceExhausted(too_big)
        self.input_seq += 1
        self.input_window -= 1
        return header, message

    def result(self):
        """A finished stream-unary call's reply, or its exception raised."""
        if self.error is not None:
            raise self.error
        return self.reply


DUPLEX_SLOTS = ("server_streaming", "input_window", "input_seq", "writes_done", "reply",
                "batch_max")


def send_now(sock, frames):
    """Send ``frames`` on the async client's socket before returning, in
    order with every send before it, from code that does not await (a
    write that only adds to a batch, the loop's callback that sends it).
    The operation runs at its first step, or at its second after one
    fairness yield (kelpie._kelpie's per-socket budget); DONTWAIT makes a
    full pipe raise instead of waiting (the client's SNDHWM is 0, so it is
    not expected)."""
    op = sock.send_multipart(frames, _zmq.DONTWAIT)
    try:
        op.send(None)
        op.send(None)
    except StopIteration:
        return
    raise Unavailable("the client's socket did not take a stream message at once")


class AsyncDuplex(DuplexCore):
    """The async client's I/O for a client-streamed call, mixed in before
    ``kelpie.client._StreamState`` (which kelpie.client combines with it as
    ``_DuplexState``; its slots add ``write_waiter`` and ``writer``)."""

    __slots__ = ()

    def _init_async(self, server_streaming):
        self._init_input(server_streaming)
        self.write_waiter = None
        self.writer = None
        # Requests written but not sent yet, while the worker reads batches
        # (protocol.md §5.8): sent as one CHUNK when the batch is full, the
        # window is used up, or the writer lets the loop run (flush_handle).
        self.pending = []
        self.pending_bytes = 0
        self.flush_handle = None

    def _wake_writer(self):
        waiter = self.write_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def write(self, message):
        if not self.started:
            await self.start()
        self.check_write()
        while self.input_window <= 0:
            self.flush()  # never wait for window with requests unsent
            self.write_waiter = self.client._loop.create_future()
            try:
                await self.write_waiter
            finally:
                self.write_waiter = None
            self.check_write()
        client = self.client
        if self.batch_max > 1:
            self.add(message, client)
            return
        await client._sock.send_multipart(
            self.chunk_frames(message, client._conn.max_message_size))

    def add(self, message, client):
        """Write ``message`` in batch mode (the window has room): add it to
        the pending batch, or send it alone if it is large or to be
        compressed; send the batch once it is full or takes the last of the
        window, else make sure the loop sends it at its next turn."""
        n = len(message)
        zip_ = client._zip
        limit = client._conn.max_message_size
        if n >= BATCH_ALONE or (zip_.setting and n >= zip_.threshold):
            self.flush()
            send_now(client._sock, self.chunk_frames(message, limit))
            return
        # The header of a batch: ids, flags, sequence, and up to 3 bytes per size.
        if self.pending and (self.pending_bytes + n > BATCH_BYTES or
                             self.pending_bytes + n + 40 + 3 * len(self.pending) > limit):
            self.flush()
        pending = self.pending
        if not pending and n + 40 > limit:
            send_now(client._sock, self.chunk_frames(message, limit))  # refuses it, sized
            return
        pending.append(message)
        self.pending_bytes += n
        self.input_seq += 1
        self.input_window -= 1
        if len(pending) >= self.batch_max or self.input_window <= 0:
            self.flush()
        elif self.flush_handle is None:
            self.flush_handle = client._loop.call_soon(self.flush_soon)

    def flush(self):
        """Send the pending requests now: one CHUNK (BATCH if several)."""
        handle = self.flush_handle
        if handle is not None:
            handle.cancel()
            self.flush_handle = None
        pending = self.pending
        if not pending:
            return
        self.pending = []
        self.pending_bytes = 0
        first = self.input_seq - len(pending)
        if len(pending) == 1:
            frames = (_wire.chunk(self.rid, first), pending[0])
        else:
            frames = (_wire.batch_chunk(self.rid, first, [len(m) for m in pending]),
                      b"".join(pending))
        send_now(self.client._sock, frames)

    def flush_soon(self):
        """The loop's turn after a write left requests pending."""
        self.flush_handle = None
        if self.finished:
            self.pending = []  # the call ended (cancelled, deadline): nothing goes
            return
        try:
            self.flush()
        except Exception as exc:  # nobody awaits this: the call carries it
            self.cancel()
            self.error = exc

    async def done_writing(self):
        if not self.started:
            await self.start()
        if self.writes_done or self.finished:
            return
        self.writes_done = True
        self.flush()
        await self.client._sock.send_multipart([_wire.end(self.rid)])

    async def wait_reply(self):
        if not self.started:
            await self.start()
        while not self.finished:
            self.waiter = self.client._loop.create_future()
            try:
                await self.waiter
            except asyncio.CancelledError:
                self.cancel()
                raise
            finally:
                self.waiter = None
        return self.result()

    def stop_writer(self):
        writer = self.writer
        if writer is not None and not writer.done() and writer is not asyncio.current_task():
            writer.cancel()

    async def pump(self, requests, encode):
        """Write every request of ``requests`` (async or plain iterable),
        then END. Stops quietly when the call ends first; an iterator that
        raises cancels the call, and its exception becomes the call's."""
        try:
            if hasattr(requests, "__aiter__"):
                async for request in requests:
                    if self.finished:
                        return
                    await self.write(encode(request))
            else:
                for request in requests:
                    if self.finished:
                        return
                    await self.write(encode(request))
            await self.done_writing()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: B036 - the call carries it
            if not self.finished:
                self.cancel()
                self.error = exc


class SyncDuplex(DuplexCore):
    """kelpie.sync's I/O for a client-streamed call, mixed in before
    ``kelpie.sync._StreamState`` (combined there as ``_DuplexState``, whose
    ``wait_once`` reads one message from the thread's socket). Writes and
    reads happen on the thread that started the call; a request iterator
    given to ``stream_unary`` or ``stream_stream`` is pulled on that thread,
    as the input window allows (for ``stream_stream``: whenever the reader
    waits for a reply).

    Batches (protocol.md §5.8), once the worker has said it reads them: a
    blocking thread has no loop turn to batch up to, so only requests that
    are ready at once are batched, namely those of a request iterator that
    reports how many it still holds (``operator.length_hint``: a list, a
    tuple, ``itertools.repeat``, a deque...). Up to that many, at most the
    window left and ``batch_max``, are pulled and sent as one CHUNK. Any
    other iterator (a generator) may block in ``next()`` (one fed by another
    thread), so each request it yields is sent before the next is pulled;
    so is each ``write()``. A request iterator that raises cancels the call,
    and what was pulled of the batch it was filling is not sent."""

    __slots__ = ()

    def write(self, message):
        if not self.started:
            self.start()
        self.check_write()
        while self.input_window <= 0:
            self.wait_once()
            self.check_write()
        self.conn.send(self.chunk_frames(message, self.conn.max_message_size))

    def write_ready(self, messages):
        """Send ``messages`` (no more than the window left), in BATCH CHUNKs
        of up to ``batch_max`` where the worker reads them. A message that is
        large or to be compressed goes in a CHUNK of its own; a batch ends
        before it would cross the broker's message size limit; a message
        over that limit raises ResourceExhausted as :meth:`write` does, after
        the ones before it have gone."""
        conn = self.conn
        limit = conn.max_message_size
        most = self.batch_max
        if most <= 1:
            for message in messages:
                conn.send(self.chunk_frames(message, limit))
            return
        zip_ = self.client._zip
        alone = min(BATCH_ALONE, zip_.threshold) if zip_.setting else BATCH_ALONE
        batch = []
        nbytes = 0
        for message in messages:
            n = len(message)
            if n >= alone:
                self._send_batch(batch)
                batch = []
                nbytes = 0
                conn.send(self.chunk_frames(message, limit))
                continue
            # The header of a batch: ids, flags, sequence, and up to 3 bytes per size.
            if batch and (len(batch) >= most or nbytes + n > BATCH_BYTES or
                          nbytes + n + 40 + 3 * len(batch) > limit):
                self._send_batch(batch)
                batch = []
                nbytes = 0
            if not batch and n + 40 > limit:
                conn.send(self.chunk_frames(message, limit))  # refuses it, sized
                continue
            batch.append(message)
            nbytes += n
        self._send_batch(batch)

    def _send_batch(self, batch):
        if not batch:
            return
        if len(batch) == 1:
            self.conn.send(self.chunk_frames(batch[0], self.conn.max_message_size))
            return
        first = self.input_seq
        self.input_seq += len(batch)
        self.input_window -= len(batch)
        self.conn.send((_wire.batch_chunk(self.rid, first, [len(m) for m in batch]),
                        b"".join(batch)))

    def done_writing(self):
        if not self.started:
            self.start()
        if self.writes_done or self.finished:
            return
        self.writes_done = True
        self.conn.send([_wire.end(self.rid)])

    def wait_reply(self):
        if not self.started:
            self.start()
        while not self.finished:
            self.wait_once()
        return self.result()

    def pump(self):
        """Write from the request iterator while the window is open; END
        when it is exhausted. An iterator that raises cancels the call."""
        requests = self.requests
        encode = self.encode
        try:
            while self.input_window > 0 and not self.finished:
                if self.batch_max > 1:
                    ready = _length_hint(requests, 0)
                    if ready > 1:
                        # More window may be in already (the worker's
                        # CREDIT): take it in before deciding how many go.
                        self.read_ready()
                        take = min(ready, self.input_window, self.batch_max)
                        batch = [encode(r) for r in _islice(requests, take)]
                        if batch and not self.finished:
                            self.write_ready(batch)
                        if len(batch) == take:
                            continue
                        # The iterator held fewer than it said: it is exhausted.
                        self.requests = None
                        self.done_writing()
                        return
                try:
                    request = next(requests)
                except StopIteration:
                    self.requests = None
                    self.done_writing()
                    return
                self.write(encode(request))
        except RpcError:
            raise
        except Exception as exc:
            self.requests = None
            self.cancel()
            self.error = exc
            raise

    def pump_all(self):
        """A stream-unary call: write every request of the iterator, then
        END, waiting for window as the worker reads."""
        if not self.started:
            self.start()
        while self.requests is not None and not self.finished:
            if self.input_window > 0:
                self.pump()
            else:
                self.wait_once()

    def next(self):
        if not self.started:
            self.start()
        while not self.chunks and not self.finished:
            if self.requests is not None and self.input_window > 0:
                self.pump()
                continue
            self.wait_once()
        return self.next_ready()


def _identity(value):
    return value


class _CallBase:
    """What both async client-streamed call objects share."""

    __slots__ = ("_state", "_encode", "_decode", "__weakref__")

    def __init__(self, state, requests=None, encode=None, decode=None):
        self._state = state
        self._encode = encode or _identity
        self._decode = decode or _identity
        if requests is not None:
            state.writer = asyncio.get_running_loop().create_task(
                state.pump(requests, self._encode))

    async def write(self, message) -> None:
        """Send one request; waits while the worker's input window is shut."""
        await self._state.write(self._encode(message))

    async def done_writing(self) -> None:
        """Tell the worker no more requests follow (END); idempotent."""
        await self._state.done_writing()

    def cancel(self) -> bool:
        """Cancel the call if it has not finished; True if it was running."""
        return self._state.cancel()

    def done(self) -> bool:
        return self._state.finished

    @property
    def metadata(self) -> dict:
        """Trailing metadata (``dict[str, bytes]``), once the call has ended."""
        return self._state.trailing

    @property
    def request_id(self) -> int:
        return self._state.rid

    def __del__(self):
        state = self._state
        if state.started and not state.finished:
            try:
                state.cancel()
            except Exception:
                pass


class StreamUnaryCall(_CallBase):
    """A client-streaming call: write requests, then await the one reply.

    ``reply = await call`` (after :meth:`done_writing`, or with ``requests``
    given to :meth:`kelpie.Client.stream_unary`, which writes them itself).
    """

    __slots__ = ()

    def __await__(self):
        return self._result().__await__()

    async def _result(self):
        return self._decode(await self._state.wait_reply())


class StreamStreamCall(_CallBase):
    """A bidirectional call: write requests and read replies, in any order.

    ``async for reply in call`` (or ``await call.read()``, which returns
    None at the end) reads replies; ``write``/``done_writing`` send. Leaving
    early (``cancel()``, ``async with`` exit, the iterating task cancelled)
    sends CANCEL. After the end, ``metadata`` holds the trailing metadata.
    """

    __slots__ = ()

    def __aiter__(self):
        return self

    async def __anext__(self):
        return self._decode(await self._state.next())

    async def read(self):
        """The next reply, or None once the stream has ended (as grpc.aio's EOF)."""
        try:
            return await self.__anext__()
        except StopAsyncIteration:
            return None

    async def __aenter__(self):
        if not self._state.started:
            await self._state.start()
        return self

    async def __aexit__(self, *exc):
        self._state.cancel()


class BlockingStreamStreamCall:
    """A bidirectional call of kelpie.sync: ``write``, ``done_writing`` and
    ``for reply in call``, all on the thread that started it; ``close()``
    (or leaving a ``with`` block, or dropping the call) cancels it."""

    __slots__ = ("_state", "_encode", "_decode", "__weakref__")

    def __init__(self, state, encode=None, decode=None):
        self._state = state
        self._encode = encode or _identity
        self._decode = decode or _identity

    def write(self, message) -> None:
        """Send one request; blocks while the worker's input window is shut."""
        self._state.write(self._encode(message))

    def done_writing(self) -> None:
        """Tell the worker no more requests follow (END); idempotent."""
        self._state.done_writing()

    def __iter__(self):
        return self

    def __next__(self):
        return self._decode(self._state.next())

    def __enter__(self):
        self._state.start()
        return self

    def __exit__(self, *exc):
        self._state.cancel()

    def close(self) -> bool:
        """Cancel the call if it has not finished; True if it was running."""
        return self._state.cancel()

    cancel = close

    @property
    def done(self) -> bool:
        return self._state.finished

    @property
    def metadata(self) -> dict:
        """Trailing metadata (``dict[str, bytes]``), once the call has ended."""
        return self._state.trailing

    def __del__(self):
        state = self._state
        if state.started and not state.finished:
            try:
                state.cancel()
            except Exception:
                pass
