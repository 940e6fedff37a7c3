"""FaultProxy: a TCP proxy on 127.0.0.1 that damages a server's answers on purpose, for fault tests.

It sits between the runner and an upstream server (the emulator) and passes the client's bytes through
untouched. Each piece the upstream sends (one socket read, up to 64 KiB) draws, from one seeded RNG, at
most one fault:

- ``reset``: the client's connection is aborted with SO_LINGER 0 (the client sees ECONNRESET), after a
  random prefix of the piece (possibly none, so before the headers too) was forwarded;
- ``truncate``: a random prefix of the piece is forwarded, then both connections are closed cleanly (FIN);
- ``drop``: 1 to 4 bytes at a random place in the piece are left out and the connection stays open (a
  whole HTTP chunk is at least 5 bytes, so a drop never removes one cleanly);
- ``corrupt``: one byte that is a double quote, CR or LF is replaced by an ASCII control character.

Why corruption targets those bytes, and what that leaves out: HTTP/1.1 without TLS carries no checksum,
so a flipped letter inside the answer's text arrives as a well-formed answer with a different text, and
no client can tell (over TLS, which the real endpoint uses, the record MAC turns it into a connection
error). The bytes this proxy flips are the ones that frame the answer: CR and LF end status, header,
chunk-size and SSE lines, and a double quote never appears unescaped inside a JSON string (nor do CR or
LF), so it is structure; a control character is not allowed in a status or header line, a chunk-size
line, outside JSON strings, or raw inside them. Every corruption is therefore detectable, and a test may
demand that no row is ok with a damaged text. Drops and truncations are detectable by framing
(Content-Length, chunk sizes, the stream's final frame) or by the read deadlines.

The seed fixes the sequence of draws; which bytes a draw meets depends on how TCP cut the upstream's
writes, so two runs are similar, not identical.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import threading
from collections import Counter
from types import TracebackType

FAULTS = ("reset", "truncate", "drop", "corrupt")
# Bytes that only ever frame an HTTP/1.1 answer, an SSE stream or a JSON document (never raw text).
STRUCTURAL = frozenset(b'"\r\n')
# Control characters that are valid nowhere in those places; TAB, LF, CR and NUL are left out (NUL
# could read as the end of a C string in a parser and hide the damage in an odd way).
CONTROL = bytes(b for b in range(1, 32) if b not in (9, 10, 13))
READ_SIZE = 65536
THREAD_TIMEOUT = 30.0


class FaultProxy:
    """Forward 127.0.0.1:`port` to 127.0.0.1:`upstream_port`, damaging answers at the given rates.

    >>> with FaultProxy(emu.port, drop=0.02, corrupt=0.02, seed=1) as proxy:
    ...     base_url = proxy.url + "/compatible-mode/v1"

    `counts` says how many of each fault were injected (read it after stop(), or as a rough figure
    while running)."""

    def __init__(self, upstream_port: int, *, reset: float = 0.0, truncate: float = 0.0, drop: float = 0.0,
                 corrupt: float = 0.0, seed: int = 0) -> None:
        rates = {"reset": reset, "truncate": truncate, "drop": drop, "corrupt": corrupt}
        if any(not 0 <= rate <= 1 for rate in rates.values()) or sum(rates.values()) > 1:
            raise ValueError(f"fault rates must be in [0, 1] and sum to at most 1, got {rates}")
        self.upstream_port = upstream_port
        self.rates = rates
        self.counts: Counter[str] = Counter()
        self.connections = 0
        self._rng = random.Random(seed)
        self._port: int | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> "FaultProxy":
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(THREAD_TIMEOUT):
            raise RuntimeError("fault proxy did not start listening in time")
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(THREAD_TIMEOUT)
        if self._thread.is_alive():
            raise RuntimeError("fault proxy thread did not stop in time")
        self._thread = None

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FaultProxy not started")
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to start(); the thread must not die silently
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        tasks: set[asyncio.Task] = set()

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            tasks.add(task)
            try:
                await self._serve(reader, writer)
            except asyncio.CancelledError:
                pass  # stop(): asyncio would log a cancelled connection callback as an error
            finally:
                tasks.discard(task)

        server = await asyncio.start_server(on_connect, "127.0.0.1", 0, backlog=1024)
        self._port = server.sockets[0].getsockname()[1]
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            server.close()
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- one connection --------------------------------------------------------------------------

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            _abort(client_writer)
            return
        requests = asyncio.ensure_future(_pump(client_reader, upstream_writer))
        try:
            await self._answers(upstream_reader, client_writer)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            requests.cancel()
            await asyncio.gather(requests, return_exceptions=True)
            _close(upstream_writer)
            _close(client_writer)

    async def _answers(self, upstream: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        """Forward the upstream's bytes to the client, one fault draw per piece; returns when either side
        is done (a reset or truncation ends the connection)."""
        while piece := await upstream.read(READ_SIZE):
            fault = self._draw()
            if fault is None:
                client.write(piece)
            elif fault in ("reset", "truncate"):
                self.counts[fault] += 1
                client.write(piece[:self._rng.randrange(len(piece))])
                await _flush(client)
                if fault == "reset":
                    _abort(client)
                else:
                    client.close()
                return
            elif fault == "drop":
                self.counts[fault] += 1
                start = self._rng.randrange(len(piece))
                client.write(piece[:start] + piece[start + self._rng.randint(1, 4):])
            else:
                damaged = self._corrupt(piece)
                if damaged is not None:
                    self.counts[fault] += 1
                client.write(damaged if damaged is not None else piece)
            await client.drain()

    def _draw(self) -> str | None:
        point = self._rng.random()
        for fault in FAULTS:
            point -= self.rates[fault]
            if point < 0:
                return fault
        return None

    def _corrupt(self, piece: bytes) -> bytes | None:
        """The piece with one structural byte (from a random place on, wrapping) replaced; None if it has none."""
        start = self._rng.randrange(len(piece))
        for offset in range(len(piece)):
            at = (start + offset) % len(piece)
            if piece[at] in STRUCTURAL:
                return piece[:at] + bytes([self._rng.choice(CONTROL)]) + piece[at + 1:]
        return None


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The client's bytes to the upstream, untouched, until the client stops sending."""
    try:
        while data := await reader.read(READ_SIZE):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass


async def _flush(writer: asyncio.StreamWriter) -> None:
    """Wait until the written bytes left for the kernel (abort() would discard what is still buffered)."""
    await writer.drain()
    for _ in range(1000):
        if not writer.transport.get_write_buffer_size():
            return
        await asyncio.sleep(0.001)


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with an RST instead of a FIN: SO_LINGER on, linger time 0."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


def _close(writer: asyncio.StreamWriter) -> None:
    if not writer.transport.is_closing():
        writer.close()
