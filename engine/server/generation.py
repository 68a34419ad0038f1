"""One API request as an engine request: adapter, sampling params, size checks, and running it."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import anyio
from fastapi import Request

from loraplane.engine.errors import BadRequestError, EngineError, PromptTooLongError
from loraplane.engine.outputs import RequestOutput
from loraplane.engine.sampling_params import SamplingParams
from loraplane.engine.server.deps import EngineClient
from loraplane.engine.server.metrics import RequestTracker, ServerMetrics
from loraplane.engine.server.protocol import SamplingFields, Usage

logger = logging.getLogger(__name__)

T = TypeVar("T")

CLIENT_GONE = 499  # nginx's "client closed request": the status when nobody is left to answer
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1  # what torch.Generator.manual_seed takes


def adapter_for(engine: EngineClient, model: str) -> str | None:
    """The adapter a request's ``model`` names; None for the base model."""
    return None if model == engine.model_name else model


def unsupported(param: str, what: str) -> BadRequestError:
    """The 400 for a feature this server refuses rather than silently ignores."""
    return BadRequestError(f"{what} is not supported by this server", param=param)


def sampling_params(req: SamplingFields, max_tokens: int | None, prompt_tokens: int,
                    max_model_len: int, prompt_param: str) -> SamplingParams:
    """Validated SamplingParams; max_tokens None means all the room the context leaves."""
    if req.n != 1:
        raise unsupported("n", "n other than 1")
    if req.presence_penalty or req.frequency_penalty:
        raise unsupported("presence_penalty" if req.presence_penalty else "frequency_penalty",
                          "A non-zero presence or frequency penalty")
    if req.logit_bias:
        raise unsupported("logit_bias", "logit_bias")
    if req.seed is not None and not SEED_MIN <= req.seed <= SEED_MAX:
        raise BadRequestError("seed must fit in 64 bits", param="seed")
    room = max_model_len - prompt_tokens
    if room < 1:
        raise PromptTooLongError(
            f"This model's maximum context length is {max_model_len} tokens, and the prompt has "
            f"{prompt_tokens} tokens: no room is left for the completion.", param=prompt_param)
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    params = SamplingParams(
        max_tokens=room if max_tokens is None else max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=0 if req.top_k is None else req.top_k,
        seed=req.seed,
        stop=stop,
        stop_token_ids=tuple(req.stop_token_ids or ()),
        ignore_eos=req.ignore_eos,
    )
    params.validate()
    if params.max_tokens > room:
        raise PromptTooLongError(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_tokens + params.max_tokens} tokens ({prompt_tokens} in the "
            f"prompt, {params.max_tokens} for the completion). Please reduce the prompt or "
            "max_tokens.", param="max_tokens")
    return params


class Generation:
    """A running engine request: its output generator, metrics, and how it ends."""

    def __init__(self, engine: EngineClient, request_id: str, outputs: AsyncIterator[RequestOutput],
                 tracker: RequestTracker) -> None:
        self.engine = engine
        self.request_id = request_id
        self.outputs = outputs
        self.tracker = tracker
        self.first: RequestOutput | None = None
        self.finished = False
        self.finish_reason: str | None = None

    def usage(self) -> Usage:
        """Token counts so far (final once the request finished)."""
        t = self.tracker
        return Usage(prompt_tokens=t.prompt_tokens, completion_tokens=t.completion_tokens,
                     total_tokens=t.prompt_tokens + t.completion_tokens)

    async def next(self) -> RequestOutput | None:
        """The next output, or None after the finished one."""
        if self.finished:
            return None
        out, self.first = self.first, None
        if out is None:
            out = await anext(self.outputs, None)
        if out is None:
            raise RuntimeError(f"engine stream of {self.request_id} ended before finishing")
        self.finished = out.finished
        if out.finished:
            self.finish_reason = out.finish_reason or "stop"
        self.tracker.observe(out)
        return out

    async def close(self) -> None:
        """Close the engine's generator and, if the request did not finish, abort it."""
        # Shielded: this runs while a disconnect cancels the request's task, and every await in a
        # cancelled anyio scope would raise again before reaching the engine.
        with anyio.CancelScope(shield=True):
            await aclose(self.outputs)
            if not self.finished:
                self.finished = True
                self.tracker.finish("abort")
                await self.engine.abort(self.request_id)


async def start_generation(engine: EngineClient, metrics: ServerMetrics, request_id: str,
                           prompt: str | list[int], params: SamplingParams, model: str,
                           prompt_tokens: int, tenant: str | None = None) -> Generation:
    """Submit a request and wait for its first output; engine errors (including an early abort
    before the first token) raise here, before any response is sent."""
    tracker = metrics.track(model, prompt_tokens, tenant)
    outputs = engine.generate(request_id, prompt, params, adapter_for(engine, model), tenant)
    g = Generation(engine, request_id, outputs, tracker)
    try:
        g.first = await anext(g.outputs)
    except StopAsyncIteration:
        raise RuntimeError(f"engine stream of {request_id} ended without output") from None
    except EngineError:
        raise
    except BaseException:
        await g.close()
        raise
    return g


async def collect(g: Generation) -> str:
    """Run a request to its end and return its text."""
    parts: list[str] = []
    try:
        while (out := await g.next()) is not None:
            parts.append(out.text_delta)
    finally:
        await g.close()
    return "".join(parts)


async def until_disconnect(request: Request, work: Callable[[], Awaitable[T]]) -> T | None:
    """Await ``work()``; cancel it and return None if the client disconnects first."""
    result: list[T] = []
    error: list[Exception] = []

    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            logger.info("client disconnected from %s", request.url.path)
            tg.cancel_scope.cancel()

        async def run() -> None:
            try:
                result.append(await work())
            except Exception as exc:
                error.append(exc)
            finally:
                tg.cancel_scope.cancel()

        tg.start_soon(watch)
        tg.start_soon(run)
    if error:
        raise error[0]
    return result[0] if result else None


async def aclose(it: object) -> None:
    """Close an async generator (a no-op for other iterators)."""
    close = getattr(it, "aclose", None)
    if close is not None:
        await close()
