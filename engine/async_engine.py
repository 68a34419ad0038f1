"""Runs the engine's step loop on its own thread and serves asyncio callers (the HTTP API)."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from loraplane.engine.engine import LLMEngine
from loraplane.engine.errors import AdapterExistsError, EngineDeadError
from loraplane.engine.outputs import AdapterInfo, EngineStats, RequestOutput
from loraplane.engine.sampling_params import SamplingParams
from loraplane.engine.sequence import Sequence

log = logging.getLogger(__name__)
_Done = Callable[[Any, "BaseException | None"], None]


class AsyncEngine:
    """Thread-safe front of an LLMEngine: every engine mutation runs on the engine thread."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.model_name = engine.model_name
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], _Done]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._adapter_lock = asyncio.Lock()

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the engine thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
            self._thread.start()

    async def shutdown(self) -> None:
        """Stop the engine thread after the current step."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
            self._thread = None

    def is_healthy(self) -> bool:
        return self._error is None and self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._run_calls()
                if self.engine.has_work():
                    self.engine.step()
                else:
                    self._wake.wait(0.5)
                    self._wake.clear()
        except BaseException as e:  # the engine is dead: fail every waiter loudly
            log.exception("engine loop crashed")
            self._error = e
            self._fail_all(e)

    def _run_calls(self) -> None:
        while True:
            try:
                fn, done = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                result = fn()
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                done(None, e)
            else:
                done(result, None)

    def _fail_all(self, error: BaseException) -> None:
        sched = self.engine.scheduler
        for seq in [*sched.running, *sched.waiting]:
            seq.finish_reason = "abort"
            if seq.on_output is not None:
                seq.on_output(RequestOutput(seq.request_id, "", [], True, "abort"))
        while True:
            try:
                _, done = self._calls.get_nowait()
            except queue.Empty:
                return
            done(None, EngineDeadError(f"the engine stopped: {error}"))

    async def _call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the engine thread between steps; returns its result or raises its error."""
        if self._error is not None or self._thread is None:
            raise EngineDeadError("the engine is not running")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()

        def done(result: Any, error: BaseException | None) -> None:
            def settle() -> None:
                if fut.done():
                    return
                if error is not None:
                    fut.set_exception(error)
                else:
                    fut.set_result(result)
            loop.call_soon_threadsafe(settle)

        self._calls.put((fn, done))
        self._wake.set()
        return await fut

    # ---- requests -----------------------------------------------------------------------------

    async def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                       adapter: str | None,
                       tenant: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's output deltas; closing the iterator aborts the request. An error
        the engine ends the request with (early abort) is raised instead of yielded."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()

        def on_output(out: RequestOutput) -> None:
            loop.call_soon_threadsafe(outputs.put_nowait, out)

        seq: Sequence = await self._call(
            lambda: self.engine.add_request(request_id, prompt, params, adapter, on_output,
                                            tenant))
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                finished = out.finished
                if out.error is not None:
                    raise out.error
                yield out
        finally:
            if not finished:
                # The consumer went away (client disconnected): free the pages now.
                self._calls.put((lambda: self.engine.abort(seq), lambda r, e: None))
                self._wake.set()

    async def abort(self, request_id: str) -> None:
        """Abort a running or waiting request by id (no-op when unknown)."""
        def find_and_abort() -> None:
            sched = self.engine.scheduler
            for seq in [*sched.running, *sched.waiting]:
                if seq.request_id == request_id:
                    self.engine.abort(seq)
        await self._call(find_and_abort)

    # ---- adapters -----------------------------------------------------------------------------

    async def load_adapter(self, name: str, path: str) -> AdapterInfo:
        """Read and validate off the engine thread, then register between steps."""
        async with self._adapter_lock:
            if name in self.engine.adapters:
                # Checked again on the engine thread; this only spares a useless read.
                raise AdapterExistsError(f"adapter {name!r} is already loaded", param="lora_name")
            source = await asyncio.to_thread(self.engine.read_adapter, name, path)
            info: AdapterInfo = await self._call(
                lambda: self.engine.add_adapter(name, path, source))
            log.info("adapter %s loaded from %s (rank %d, %s)", name, path, info.rank,
                     ",".join(info.modules))
            return info

    async def unload_adapter(self, name: str) -> None:
        await self._call(lambda: self.engine.unload_adapter(name))
        log.info("adapter %s unloaded", name)

    def list_adapters(self) -> list[AdapterInfo]:
        return self.engine.list_adapters()

    def stats(self) -> EngineStats:
        return self.engine.stats()
