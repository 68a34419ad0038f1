"""One pipelined Redis connection that runs the request path's Lua scripts (EVALSHA).

Every request runs the admission script and, batched, the settlement script. Through redis-py a
script call costs about 130 µs of gateway CPU (connection pool, retry wrapper, command objects);
here all callers share one connection, queue their EVALSHA and wait for their reply in order
(Redis answers a connection's commands in the order it got them), parsed by hiredis: about 40 µs.
Commands queued in one event-loop turn go out in one write, so a busy gateway makes one system
call (and Redis one read) for many requests.
A script is loaded again when Redis answers NOSCRIPT (it restarted or was flushed); a lost
connection fails the calls waiting on it (``redis.exceptions.ConnectionError``) and the next call
connects again.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import deque
from collections.abc import Sequence
from typing import Any, cast

import hiredis
from redis.asyncio.connection import parse_url
from redis.exceptions import ConnectionError, ResponseError

Args = Sequence[str | int | float]


class Script:
    """A Lua script and its SHA-1, the name Redis runs it by."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


class _Connection(asyncio.Protocol):
    """Replies of one connection, handed to waiters in the order their commands went out."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader(encoding="utf-8", replyError=ResponseError)
        self.waiters: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.outgoing: list[bytes] = []  # commands not written yet

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            waiter = self.waiters.popleft()
            if not waiter.done():  # a caller that left still had its reply read
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectionError(f"Redis connection lost: {exc}"))

    def send(self, commands: Sequence[Sequence[Any]]) -> list[asyncio.Future[Any]]:
        """Queue ``commands`` for this loop turn's write; a future for each reply."""
        if self.lost or self.transport is None:
            raise ConnectionError("Redis connection lost")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]
        if not self.outgoing:
            loop.call_soon(self._write)
        self.outgoing.extend(hiredis.pack_command(tuple(c)) for c in commands)
        self.waiters.extend(futures)
        return futures

    def _write(self) -> None:
        # One write (one system call) for every command queued since the last one.
        data, self.outgoing = b"".join(self.outgoing), []
        if self.transport is not None and not self.lost:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def _replies(futures: list[asyncio.Future[Any]]) -> list[Any]:
    try:
        return [await f for f in futures]
    finally:
        for f in futures:  # after an error or a cancel: the others' outcomes are not wanted
            if not f.done():
                f.cancel()
            elif not f.cancelled():
                f.exception()  # marks a lost connection's error as seen (no warning at exit)


class ScriptRunner:
    """Runs scripts on Redis at ``url`` (``redis://``, ``rediss://`` or ``unix://``).

    ``timeout_s`` bounds connecting; calls wait for Redis as long as it takes.
    """

    def __init__(self, url: str, timeout_s: float | None = None) -> None:
        self.options = parse_url(url)
        self.tls = url.startswith("rediss://")
        self.timeout_s = timeout_s
        self._conn: _Connection | None = None
        self._connecting = asyncio.Lock()

    async def run(self, script: Script, calls: Sequence[Args]) -> list[Any]:
        """Each call's reply, in order; the first error reply is raised."""
        conn = await self._connection()
        futures = conn.send([("EVALSHA", script.sha, 0, *args) for args in calls])
        replies = await _replies(futures)
        missing = [i for i, r in enumerate(replies)
                   if isinstance(r, ResponseError) and str(r).startswith("NOSCRIPT")]
        if missing:  # these did not run: load the script, run them again
            await _replies(conn.send([("SCRIPT", "LOAD", script.source)]))
            again = await _replies(conn.send([("EVALSHA", script.sha, 0, *calls[i])
                                              for i in missing]))
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        for r in replies:
            if isinstance(r, ResponseError):
                raise r
        return replies

    async def _connection(self) -> _Connection:
        if self._conn is not None and not self._conn.lost:
            return self._conn
        async with self._connecting:
            if self._conn is None or self._conn.lost:
                self._conn = await asyncio.wait_for(self._connect(), self.timeout_s)
            return self._conn

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        o = self.options
        try:
            if "path" in o:
                _, conn = await loop.create_unix_connection(_Connection, o["path"])
            else:
                _, conn = await loop.create_connection(
                    _Connection, o.get("host", "localhost"), int(o.get("port", 6379)),
                    ssl=ssl.create_default_context() if self.tls else None)
        except OSError as e:
            raise ConnectionError(f"cannot connect to Redis: {e}") from None
        handshake: list[tuple[Any, ...]] = []
        if o.get("password") is not None:
            user = o.get("username")
            handshake.append(("AUTH", user, o["password"]) if user else ("AUTH", o["password"]))
        if int(o.get("db") or 0):
            handshake.append(("SELECT", int(o["db"])))
        for reply in await _replies(conn.send(handshake)):
            if isinstance(reply, ResponseError):
                conn.close()
                raise reply
        return conn

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
