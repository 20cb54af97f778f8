"""Text generation with vLLM: one engine per model, fed by many threads at once.

The engine is vLLM's ``AsyncLLM``. It runs on an asyncio loop of its own, in a daemon
thread started by ``load()``, because the worker's threads are plain threads (Celery's
threads pool; its main thread runs Celery). Every task thread calls ``run_one``, which
hands its request to that loop and then waits on a queue for the streamed outputs, so
all requests are in the engine together and vLLM batches them continuously: there is
no lock around generation, only around the bookkeeping of who is running.

``run_one`` tokenizes in the calling thread (the engine's tokenizer is thread-safe;
``messages`` are formatted by the chat-template formatter the API counts with),
refuses prompts that leave no room for ``max_tokens`` before anything reaches the
engine, streams each new piece of text to ``item.on_delta`` and aborts the request
inside the engine when the job is canceled. A request's ``gpu_seconds`` is its share
of the engine: its wall time, with every interval divided by the number of requests
running then.

vLLM is imported when a method needs it, never at import time, so the API and the
registry can import this module on machines without it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import queue
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vramq.jobs.errors import JobCanceled, JobError, MissingExtra
from vramq.jobs.prompts import format_chat

from .base import Backend, ItemResult, WorkItem

if TYPE_CHECKING:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.tokenizers import TokenizerLike
    from vllm.v1.engine.async_llm import AsyncLLM

log = logging.getLogger(__name__)

CPU_KV_CACHE_GIB = 1
"""KV cache on CPU (vLLM's ``VLLM_CPU_KVCACHE_SPACE``) when the environment sets none:
1 GiB holds 1M tokens of the tiny model; real models want more."""

_VLLM_ENV = {
    # No usage reports leave the machine (the workers reach no network anyway).
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_DO_NOT_TRACK": "1",
}
"""vLLM settings that only exist as environment variables; an operator's own values win."""

POLL_S = 0.05
"""How often a waiting ``run_one`` looks at ``is_canceled`` when no output arrives."""

ABORT_TIMEOUT_S = 10.0
"""How long ``run_one`` waits for the engine to drop a canceled request."""

_DONE = object()
"""Queue sentinel: the request's stream ended."""


def _engine_classes(device: str) -> tuple[type[AsyncEngineArgs], type[AsyncLLM]]:
    """vLLM's ``AsyncEngineArgs`` and ``AsyncLLM``, or an error naming the extra to install.

    Imported here rather than in ``load``: importing vllm keeps tracebacks of some
    import errors it survives, and those would hold the importing frame's locals, the
    engine among them, for the life of the process.
    """
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise MissingExtra("vllm", "text-cpu" if device == "cpu" else "text") from None
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncEngineArgs, AsyncLLM


class VllmTextBackend(Backend):
    """A causal LM served by one vLLM ``AsyncLLM`` loaded from ``entry.weights``."""

    batching = "engine"

    def __init__(self, entry, device: str):
        super().__init__(entry, device)
        self.engine: AsyncLLM | None = None
        """The ``vllm.v1.engine.async_llm.AsyncLLM``; lives on ``self.loop``."""
        self.loop: asyncio.AbstractEventLoop | None = None
        self.tokenizer: TokenizerLike | None = None
        self.load_seconds: float | None = None
        self.peak_active = 0
        """The most requests ever in the engine at once (since ``load``)."""
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._active = 0
        self._share_clock = 0.0
        self._clock_at = 0.0

    # --- lifecycle -----------------------------------------------------------------

    def engine_args(self) -> dict[str, Any]:
        """The engine's settings, as keyword arguments of ``vllm.AsyncEngineArgs``.

        ``vllm.LLM(**backend.engine_args())`` builds the offline engine with the same
        settings (benchmarks compare the two).
        """
        weights = str(self.entry.weights)
        return {
            "model": weights,
            "tokenizer": weights,
            "dtype": self.entry.dtype,
            "max_model_len": self.entry.limit.max_context,
            # The runtime sends an engine model up to max_batch jobs at once.
            "max_num_seqs": self.entry.max_batch,
            # No torch.compile or graph capture on CPU: they only lengthen start-up there.
            "enforce_eager": self.device == "cpu",
            "disable_log_stats": True,
            "seed": 0,
            # vLLM takes 90 % of the card by default; beside other models it keeps to its share.
            **(
                {"gpu_memory_utilization": round(min(self.memory_fraction, 0.95), 3)}
                if self.device == "cuda" and self.memory_fraction
                else {}
            ),
        }

    def load(self) -> None:
        if self.device == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(CPU_KV_CACHE_GIB))
        for name, value in _VLLM_ENV.items():
            os.environ.setdefault(name, value)
        AsyncEngineArgs, AsyncLLM = _engine_classes(self.device)

        started = time.perf_counter()
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name=f"vllm-{self.entry.id}", daemon=True)
        thread.start()

        async def start():
            # Created on its loop: the engine's output handler is a task of that loop.
            return AsyncLLM.from_engine_args(AsyncEngineArgs(**self.engine_args()))

        try:
            self.engine = asyncio.run_coroutine_threadsafe(start(), loop).result()
        except BaseException:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()
            raise
        self.loop, self._thread = loop, thread
        self.tokenizer = self.engine.get_tokenizer()
        self._clock_at = time.perf_counter()
        self.load_seconds = time.perf_counter() - started

    def unload(self) -> None:
        engine, loop, thread = self.engine, self.loop, self._thread
        self.engine = self.loop = self._thread = self.tokenizer = None
        if engine is None:
            return
        assert loop is not None and thread is not None  # started with the engine (load)

        async def stop(engine):
            engine.shutdown()  # stops the engine processes and the output handler task

        try:
            asyncio.run_coroutine_threadsafe(stop(engine), loop).result()
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()
            # Tracebacks of past jobs can still reference the engine; collected now, its
            # finalizer runs while the interpreter is whole (not at exit, where it fails).
            engine = None
            gc.collect()

    def unfinished_requests(self) -> int:
        """How many requests the engine holds that have not finished."""
        engine, loop = self.engine, self.loop
        if engine is None:
            return 0
        assert loop is not None  # started with the engine (load)

        async def count() -> int:
            return engine.get_num_unfinished_requests()

        return asyncio.run_coroutine_threadsafe(count(), loop).result()

    # --- running -------------------------------------------------------------------

    def run_batch(self, items: list[WorkItem]) -> list[ItemResult | BaseException]:
        # Engine backends are fed one job per thread; a batch is just many of those.
        results: list[ItemResult | BaseException] = []
        for item in items:
            try:
                results.append(self.run_one(item))
            except JobError as exc:
                results.append(exc)
        return results

    def prompt_token_ids(self, inp: dict[str, Any]) -> list[int]:
        """The prompt's tokens: ``prompt`` as given, or ``messages`` through the chat
        template, formatted by the API's own formatter (``jobs.prompts.format_chat``): the
        tokens the API counted at admission are the tokens the engine gets."""
        if self.tokenizer is None:
            raise RuntimeError("load() must run before the first job")
        if inp.get("messages") is not None:
            from jinja2 import TemplateError

            try:
                text = format_chat(Path(self.entry.weights), inp["messages"])
            except (ValueError, TemplateError) as exc:  # no chat template; one that refuses the turns
                raise JobError(f"model {self.entry.id!r} cannot format messages: {exc}", code="invalid_input") from None
            # The template writes the special tokens itself (a BOS where the model has one).
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(inp["prompt"])

    def sampling_params(self, inp: dict[str, Any]):
        """The request's ``vllm.SamplingParams``; outputs stream as deltas."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            max_tokens=inp["max_tokens"],
            temperature=inp["temperature"],
            top_p=inp["top_p"],
            seed=inp.get("seed"),
            stop=inp.get("stop") or None,
            output_kind=RequestOutputKind.DELTA,
        )

    def run_one(self, item: WorkItem) -> ItemResult:
        if self.engine is None:
            raise RuntimeError("load() must run before the first job")
        if item.is_canceled():
            raise JobCanceled("canceled")
        from vllm.inputs.engine import tokens_input

        inp = item.input
        ids = self.prompt_token_ids(inp)
        room = self.entry.limit.max_context - inp["max_tokens"]
        if len(ids) > room:
            raise JobError(
                f"the prompt has {len(ids)} tokens; with max_tokens {inp['max_tokens']} model "
                f"{self.entry.id} has room for {room} (max_context {self.entry.limit.max_context})",
                code="context_length_exceeded",
            )
        params = self.sampling_params(inp)
        request_id = f"{item.job_id}-{uuid.uuid4().hex[:8]}"  # unique across retries of a job
        outputs: queue.Queue = queue.Queue()
        engine, loop = self.engine, self.loop
        assert loop is not None  # started with the engine (load)

        async def stream():
            try:
                async for out in engine.generate(tokens_input(ids), params, request_id):
                    done = out.outputs[0]
                    outputs.put((done.text, len(done.token_ids), done.finish_reason))
                outputs.put(_DONE)
            except asyncio.CancelledError:
                outputs.put(_DONE)
                raise
            except Exception as exc:  # the waiting thread raises it as the job's error
                outputs.put(exc)

        parts: list[str] = []
        completion_tokens, finish_reason, finished = 0, None, False
        clock_start = self._enter()
        future = asyncio.run_coroutine_threadsafe(stream(), loop)
        try:
            while True:
                if item.is_canceled():
                    raise JobCanceled("canceled")
                try:
                    msg = outputs.get(timeout=POLL_S)
                except queue.Empty:
                    if future.done() and outputs.empty():  # the loop was stopped under us
                        raise JobError("the text engine stopped", code="engine_dead") from None
                    continue
                if msg is _DONE:
                    finished = True
                    if finish_reason == "abort":  # not ours: ours leave the loop above
                        raise JobError("the text engine aborted the request", code="engine_error")
                    break
                if isinstance(msg, BaseException):
                    finished = True
                    raise _job_error(msg)
                text, n_tokens, reason = msg
                completion_tokens += n_tokens
                finish_reason = reason or finish_reason
                if text:
                    parts.append(text)
                    item.on_delta(text)
        finally:
            if not finished:  # canceled, or on_delta failed: the engine must drop it
                self._abort(request_id, future)
            gpu_seconds = self._leave(clock_start)
        return ItemResult(
            output={
                "text": "".join(parts),
                "finish_reason": finish_reason,
                "usage": {"prompt_tokens": len(ids), "completion_tokens": completion_tokens},
            },
            gpu_seconds=gpu_seconds,
        )

    def _abort(self, request_id: str, future) -> None:
        engine, loop = self.engine, self.loop
        if engine is None or loop is None or loop.is_closed():
            return
        try:
            asyncio.run_coroutine_threadsafe(engine.abort(request_id), loop).result(ABORT_TIMEOUT_S)
        except Exception:  # a dead or stuck engine computes nothing more for it anyway
            log.warning("aborting request %s in the text engine failed", request_id, exc_info=True)
        future.cancel()
        try:
            future.result(ABORT_TIMEOUT_S)
        except Exception:  # canceled, as asked; an engine error is moot now
            log.debug("request %s ended after its abort", request_id, exc_info=True)

    # --- device-time accounting ----------------------------------------------------

    def _tick(self) -> None:
        """Advance the share clock: every running request accrues ``dt / running``."""
        now = time.perf_counter()
        if self._active:
            self._share_clock += (now - self._clock_at) / self._active
        self._clock_at = now

    def _enter(self) -> float:
        with self._lock:
            self._tick()
            self._active += 1
            self.peak_active = max(self.peak_active, self._active)
            return self._share_clock

    def _leave(self, clock_start: float) -> float:
        with self._lock:
            self._tick()
            self._active -= 1
            return self._share_clock - clock_start


def _job_error(exc: BaseException) -> JobError:
    """The job's failure for an exception out of the engine, with a stable code."""
    from vllm.exceptions import VLLMClientError
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(exc, JobError):
        return exc
    if isinstance(exc, EngineDeadError):
        error = JobError(f"the text engine died: {exc}", code="engine_dead")
    elif isinstance(exc, VLLMClientError):
        error = JobError(f"the text engine refused the request: {exc}", code="invalid_input")
    else:
        error = JobError(f"the text engine failed: {exc.__class__.__name__}: {exc}", code="engine_error")
    error.__cause__ = exc
    return error
