"""The request path: admit (key, access, limits), pick a replica, relay, settle usage.

An adapter's registry record names the model engines serve it under (``engine_name``, e.g.
``acme/poet@<version>``): requests go out, and replicas are ranked by residency, under that name;
answers come back with the tenant's own id (``acme/poet``) in their ``model`` fields.

Non-streaming answers are read whole from the engine before the client sees a byte, and streams
up to their first event, so a replica that fails before then is retried on the next one in the
router's order, as is one that answers 503 or 404 ``model_not_found`` (it does not hold a version
the operator just rolled out elsewhere, and the last residency poll did not show where). A client
that leaves closes the engine connection, which aborts the request there. Streams always ask the
engine for a final usage event (dropped again if the client did not ask for it), so usage is
metered from the engine's own counts.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import anyio
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from loraplane.engine.server.deps import TENANT_HEADER
from loraplane.engine.server.errors import error_body
from loraplane.gateway import routing
from loraplane.gateway.cost import RequestShape, request_shape
from loraplane.gateway.errors import (
    GatewayError,
    bad_request,
    invalid_api_key,
    model_not_found,
    no_replica,
)
from loraplane.gateway.fleet import Fleet, Replica
from loraplane.gateway.keys import hash_key
from loraplane.gateway.limits import Admission, Outcome, Settlement, ratelimit_headers
from loraplane.gateway.metrics import GatewayMetrics
from loraplane.gateway.rename import rename_event, rename_json
from loraplane.gateway.store.base import Store

logger = logging.getLogger(__name__)

T = TypeVar("T")

JSON_HEADERS = {"Content-Type": "application/json"}
MAX_ATTEMPTS = 3
MAX_EVENT_BYTES = 16 << 20
CLIENT_GONE = 499
_UPSTREAM_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError,
                    asyncio.TimeoutError)
_LIMIT_MESSAGES = {
    "requests": "Rate limit reached for requests per minute",
    "tokens": "Rate limit reached for tokens per minute",
    "too_large": "Request too large: its prompt plus max_tokens exceeds the tokens-per-minute "
                 "limit",
    "concurrency": "Too many concurrent requests",
}


# Request ids name concurrency slots in the store, shared by gateway replicas: a random prefix
# per process and a counter (uuid4 would cost a getrandom system call per request).
_ID_PREFIX = secrets.token_hex(8)
_ID_COUNTER = itertools.count()


def next_request_id() -> str:
    """An id no other request of any gateway process has."""
    return f"{_ID_PREFIX}-{next(_ID_COUNTER)}"


@dataclass
class Ticket:
    """One admitted request: the names of its model, and what to settle when it ends."""

    tenant: str
    request_id: str
    model: str  # as the tenant named it
    reserved: int
    prompt_estimate: int
    served_as: str = ""  # as engines know it, once admitted
    # Headers of the request to engines: JSON, and the tenant (for their fair scheduling).
    upstream_headers: dict[str, str] = field(default_factory=lambda: JSON_HEADERS)

    def to_tenant(self, data: bytes, error: bool = False) -> tuple[bytes, Any]:
        """An engine's JSON answer with the model named as the tenant named it; its JSON."""
        return rename_json(data, self.served_as or self.model, self.model, error)

    def event_to_tenant(self, event: bytes) -> tuple[bytes, Any]:
        """One engine SSE event with the model named as the tenant named it; its data."""
        return rename_event(event, self.served_as or self.model, self.model)


def retry_elsewhere(status: int, data: bytes) -> bool:
    """Whether an engine's answer says another replica may serve the request.

    503: overloaded or dying. 404 ``model_not_found``: the replica does not hold the adapter
    under this engine name (yet): a new version the operator just rolled out may sit on another
    replica that the last residency poll did not show.
    """
    if status == 503:
        return True
    if status != 404:
        return False
    try:
        return bool(json.loads(data)["error"]["code"] == "model_not_found")
    except (ValueError, KeyError, TypeError):
        return False


def relayed_headers(resp: aiohttp.ClientResponse) -> dict[str, str]:
    """The engine's headers a client sees too: Retry-After (e.g. of an early-abort 503)."""
    retry = resp.headers.get("Retry-After")
    return {"retry-after": retry} if retry is not None else {}


class Proxy:
    """Serves /v1/completions and /v1/chat/completions for tenants, through the fleet."""

    def __init__(self, store: Store, fleet: Fleet, metrics: GatewayMetrics,
                 epsilon: float) -> None:
        self.store = store
        self.fleet = fleet
        self.metrics = metrics
        self.epsilon = epsilon
        self._pending: list[Settlement] = []
        self._flusher: asyncio.Task[None] | None = None

    async def handle(self, key: str, raw: bytes, path: str, chat: bool,
                     receive: Receive) -> Response:
        """Admit, route and relay one completion request (``receive``: to see the client leave)."""
        try:
            try:
                body = json.loads(raw)
            except ValueError as e:
                raise bad_request(f"Request body is not valid JSON: {e}") from None
            shape = request_shape(body, chat)
        except GatewayError:
            # Who asks comes first: a stranger's malformed request is a 401, not a 400.
            if await self.store.authenticate(hash_key(key)) is None:
                raise invalid_api_key() from None
            raise
        adapter = None if shape.model in self.fleet.known_models() else shape.model
        reserved = shape.reserved(self.fleet.max_model_len())
        ticket = Ticket("", next_request_id(), shape.model, reserved, shape.prompt_tokens)
        admission = await self.store.admit(hash_key(key), adapter, reserved, ticket.request_id)
        headers = ratelimit_headers(admission)
        self._check(admission, shape.model, headers)
        ticket.tenant = admission.tenant
        ticket.upstream_headers = {**JSON_HEADERS, TENANT_HEADER: admission.tenant}
        ticket.served_as = admission.engine_name or shape.model
        engine_adapter = ticket.served_as if adapter is not None else None
        candidates = routing.rank(engine_adapter, self._replicas_for(shape.model, adapter),
                                  self.epsilon)[:MAX_ATTEMPTS]
        rewrite = ticket.served_as != shape.model
        if rewrite:
            body["model"] = ticket.served_as
        if shape.stream and not shape.client_wants_usage:
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
            rewrite = True
        if rewrite:
            raw = json.dumps(body).encode()
        try:
            if shape.stream:
                return await self._stream(path, raw, candidates, ticket, shape, headers)
            return await self._unary(receive, path, raw, candidates, ticket, headers)
        except BaseException:
            self.settle(ticket, None)  # a no-op once the request settled itself
            raise

    def _check(self, a: Admission, model: str, headers: dict[str, str]) -> None:
        if a.outcome is Outcome.UNAUTHORIZED:
            raise invalid_api_key()
        if a.outcome is Outcome.NOT_FOUND:
            raise model_not_found(model)
        if a.outcome is Outcome.LIMITED:
            self.metrics.limited.labels(a.reason).inc()
            raise GatewayError(429, _LIMIT_MESSAGES.get(a.reason, "Rate limit reached"),
                               code="rate_limit_exceeded", type=a.reason, headers=headers)

    def _replicas_for(self, model: str, adapter: str | None) -> list[Replica]:
        healthy = self.fleet.healthy()
        return healthy if adapter is not None else [r for r in healthy if r.model == model]

    async def _unary(self, receive: Receive, path: str, raw: bytes, candidates: list[Replica],
                     ticket: Ticket, headers: dict[str, str]) -> Response:
        async def attempt() -> tuple[int, str, bytes, dict[str, str]]:
            for i, r in enumerate(candidates):
                r.in_flight += 1
                try:
                    async with r.session.post(r.base + path, data=raw,
                                              headers=ticket.upstream_headers) as resp:
                        data = await resp.read()
                    if i + 1 < len(candidates) and retry_elsewhere(resp.status, data):
                        self._missed(r, ticket, resp.status)
                        continue
                    return resp.status, resp.content_type, data, relayed_headers(resp)
                except _UPSTREAM_ERRORS as e:
                    self.fleet.mark_down(r, f"{type(e).__name__}: {e}")
                    self.metrics.retries.inc()
                finally:
                    r.in_flight -= 1
            raise no_replica()

        result = await until_disconnect(receive, attempt)
        if result is None:
            self.settle(ticket, None)
            return Response(status_code=CLIENT_GONE)
        status, content_type, data, engine_headers = result
        data, answer = ticket.to_tenant(data, error=status != 200)
        usage: dict[str, Any] | None = None
        if status == 200:
            usage = (answer.get("usage") if isinstance(answer, dict) else None) or {}
        self.settle(ticket, usage)
        return Response(data, status_code=status, media_type=content_type,
                        headers={**engine_headers, **headers})

    async def _stream(self, path: str, raw: bytes, candidates: list[Replica], ticket: Ticket,
                      shape: RequestShape, headers: dict[str, str]) -> Response:
        for i, r in enumerate(candidates):
            r.in_flight += 1
            resp: aiohttp.ClientResponse | None = None
            handed_off = False
            try:
                resp = await r.session.post(r.base + path, data=raw,
                                            headers=ticket.upstream_headers)
                if resp.status == 200:
                    first = await resp.content.readuntil(b"\n\n", max_size=MAX_EVENT_BYTES)
                    if not first:
                        raise aiohttp.ServerDisconnectedError("stream ended before any event")
                    relay = Relay(self, r, resp, first, ticket, shape.client_wants_usage)
                    handed_off = True
                    return RelayResponse(relay, headers)
                data = await resp.read()
                if i + 1 < len(candidates) and retry_elsewhere(resp.status, data):
                    self._missed(r, ticket, resp.status)
                    continue
                self.settle(ticket, None)
                return Response(ticket.to_tenant(data, error=True)[0], status_code=resp.status,
                                media_type=resp.content_type,
                                headers={**relayed_headers(resp), **headers})
            except _UPSTREAM_ERRORS as e:
                self.fleet.mark_down(r, f"{type(e).__name__}: {e}")
                self.metrics.retries.inc()
            finally:
                if not handed_off:
                    if resp is not None:
                        resp.close()
                    r.in_flight -= 1
        raise no_replica()

    def _missed(self, replica: Replica, ticket: Ticket, status: int) -> None:
        """Count a retry; a replica without the adapter ranks as such until its next report."""
        self.metrics.retries.inc()
        if status == 404:
            replica.tiers.pop(ticket.served_as, None)

    def settle(self, ticket: Ticket, usage: dict[str, Any] | None) -> None:
        """Reconcile a request's reservation in the background (it must not delay the reply).

        ``usage`` is what the engine served; None for a request no engine served (nothing is
        metered then, and the whole reservation is given back). Settlements queue while one
        batch is on its way to the store, so a busy gateway needs one round trip for many.
        """
        if not ticket.tenant:
            return
        prompt = completion = 0
        if usage is not None:
            prompt = int(usage.get("prompt_tokens") or 0)
            completion = int(usage.get("completion_tokens") or 0)
        self._pending.append(Settlement(ticket.tenant, ticket.request_id, ticket.model,
                                        ticket.reserved, prompt, completion,
                                        metered=usage is not None))
        ticket.tenant = ""  # settle once
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await self.store.settle(batch)
            except Exception as e:
                logger.error("settling %d requests failed: %s", len(batch), e)

    async def drain(self) -> None:
        """Wait for pending settlements (at shutdown)."""
        if self._flusher is not None:
            await self._flusher


class Relay:
    """One engine stream relayed to a client; ``close`` ends it on the engine and settles it."""

    def __init__(self, proxy: Proxy, replica: Replica, resp: aiohttp.ClientResponse,
                 first: bytes, ticket: Ticket, client_wants_usage: bool) -> None:
        self.proxy, self.replica, self.resp, self.first = proxy, replica, resp, first
        self.ticket, self.client_wants_usage = ticket, client_wants_usage
        self.usage: dict[str, Any] | None = None
        self.chunks = 0
        self.done = False
        self.closed = False

    async def events(self) -> AsyncIterator[bytes]:
        """The engine's SSE events, one at a time (the final usage event only if asked for)."""
        event = self.first
        try:
            while event:
                renamed, data = self.ticket.event_to_tenant(event)
                if isinstance(data, dict) and data.get("choices") == []:  # the usage event
                    self.usage = data.get("usage") or self.usage
                    if not self.client_wants_usage:
                        event = await self._next()
                        continue
                elif data == b"[DONE]":
                    self.done = True
                else:
                    self.chunks += 1
                yield renamed
                event = await self._next()
        except _UPSTREAM_ERRORS as e:
            self.proxy.fleet.mark_down(self.replica, f"{type(e).__name__}: {e}")
            body = error_body("The engine serving this request failed mid-stream.",
                              "server_error", "upstream_failed")
            yield f"data: {json.dumps(body)}\n\n".encode()
        finally:
            self.close()

    async def _next(self) -> bytes:
        return await self.resp.content.readuntil(b"\n\n", max_size=MAX_EVENT_BYTES)

    def close(self) -> None:
        """Release the engine connection (dropping it aborts an unfinished request); settle."""
        if self.closed:
            return
        self.closed = True
        self.replica.in_flight -= 1
        if self.done:
            self.resp.release()
        else:
            self.resp.close()
        usage = self.usage
        if usage is None:  # the stream was cut short: meter what was sent
            usage = {"prompt_tokens": self.ticket.prompt_estimate,
                     "completion_tokens": self.chunks}
        self.proxy.settle(self.ticket, usage)


class RelayResponse(StreamingResponse):
    """An SSE relay that ends its engine request however the response ends.

    Starlette cancels the streaming task when the client disconnects but may leave the iterator
    suspended at a ``yield`` (or never started); closing the relay here ends it at once.
    """

    def __init__(self, relay: Relay, headers: dict[str, str]) -> None:
        super().__init__(relay.events(), media_type="text/event-stream",
                         headers={**headers, "Cache-Control": "no-cache",
                                  "X-Accel-Buffering": "no"})
        self.relay = relay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                close = getattr(self.body_iterator, "aclose", None)
                if close is not None:
                    await close()
            self.relay.close()


async def until_disconnect(receive: Receive, work: Callable[[], Awaitable[T]]) -> T | None:
    """Await ``work()``; cancel it and return None if the client disconnects first."""
    task = asyncio.current_task()
    assert task is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await receive())["type"] != "http.disconnect":
            pass
        gone = True
        task.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        return await work()
    except asyncio.CancelledError:
        if not gone:
            raise
        uncancel = getattr(task, "uncancel", None)  # Python 3.11+: this cancel is handled
        if uncancel is not None:
            uncancel()
        return None
    finally:
        watcher.cancel()
