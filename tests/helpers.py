"""Test helpers: in-process servers on port 0, driven from a background event loop; engines for one
``async with``; waiting for a condition instead of sleeping."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

from common.config import ServerConfig
from common.errors import EncoderOverloaded
from encoder_server.engine import EncodeEngine
from encoder_server.server import RunningServer, start_server
from encoder_server.upsampling import GenerationStopped, UpsampledBatch, Upsampler


def wait_until(predicate: Callable[[], object], timeout: float = 30.0, what: str = "the condition") -> None:
    """Poll ``predicate()`` (every 10 ms) until it is true; after ``timeout`` seconds fail naming ``what``.

    For conditions no event announces (a metric, a file on disk, another process);
    where the code under test can set a ``threading.Event``, wait on that instead.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.01)


async def wait_until_async(predicate: Callable[[], object], timeout: float = 30.0, what: str = "the condition") -> None:
    """:func:`wait_until` inside an event loop: yields to the loop between looks, so tasks it waits on run."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.001)


def run_async(coro, timeout: float = 60.0):
    """``asyncio.run(coro)``, failing after ``timeout`` seconds instead of hanging the suite."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


@contextlib.asynccontextmanager
async def running_engine(
    backend, config: ServerConfig | None = None, /, **engine_kwargs
) -> AsyncIterator[EncodeEngine]:
    """An :class:`EncodeEngine` on ``backend`` for the body of an ``async with``, closed on the way out
    (model loop stopped, queued work failed, disk writes finished).

    With ``config``, built as a server builds it (``EncodeEngine.from_config(config, backend)``:
    its batching, memory and disk caches); otherwise ``EncodeEngine(backend, **engine_kwargs)``.
    """
    if config is not None:
        engine = EncodeEngine.from_config(config, backend, **engine_kwargs)
    else:
        engine = EncodeEngine(backend, **engine_kwargs)
    try:
        yield engine
    finally:
        engine.close()


class ServerThread:
    """Runs ``start_server`` on its own event loop in a daemon thread.

    ``target`` is ``127.0.0.1:PORT`` once started. ``stop(grace)`` drains like SIGTERM does.
    ``pad_table=True`` serves ``backend`` with its pad table, as ``flux2-encoder serve``
    loads a model, so clients receive only real rows; without it there is no table.
    """

    def __init__(self, backend, config: ServerConfig | None = None, *, pad_table: bool = False, **start_kwargs):
        self.config = replace(config or ServerConfig(), host="127.0.0.1", port=0)
        self.backend = backend
        self.start_kwargs = start_kwargs
        if pad_table:  # served as `flux2-encoder serve` loads a model: with its pad table, when it has one
            from encoder_server.models import served_pad_table
            from encoder_server.server import LoadedModel

            ids = {k: start_kwargs.pop(k) for k in ("model_id", "revision", "demo") if k in start_kwargs}
            name = self.config.served_models()[0].name
            start_kwargs["models"] = [LoadedModel(name, backend, **ids, pad_table=served_pad_table(backend))]
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.running: RunningServer | None = None

    def __enter__(self) -> ServerThread:
        self.thread.start()
        self.running = self.call(start_server(self.config, self.backend, **self.start_kwargs))
        return self

    def __exit__(self, *exc) -> None:
        self.stop(0)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.running.port}"

    def call(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call_soon(self, coro):
        """Start ``coro`` on the server's loop; returns a ``concurrent.futures.Future`` of its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self, grace: float | None = 0) -> None:
        if self.running is not None:
            self.call(self.running.stop(grace))
            self.running = None
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


class ProxyBackend:
    """Delegates to a real backend; subclasses add delays, failures or another fingerprint.

    ``calls``: forward passes asked for; ``prompts``: every prompt they held, in order.
    """

    def __init__(self, backend):
        self._backend = backend
        self.calls = 0
        self.prompts: list[str] = []
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def encode(self, prompts):
        with self._lock:
            self.calls += 1
            self.prompts.extend(prompts)
        return self._backend.encode(prompts)


class OverloadedFirst(ProxyBackend):
    """Refuses its first ``failures`` forward passes with RESOURCE_EXHAUSTED (and ``retry_after_s`` as the hint).

    ``call_times``: ``time.monotonic()`` of every forward pass asked for, refused or not.
    """

    def __init__(self, backend, failures: int, retry_after_s: float | None = None):
        super().__init__(backend)
        self.failures = failures
        self.retry_after_s = retry_after_s
        self.call_times: list[float] = []

    def encode(self, prompts):
        with self._lock:
            self.calls += 1
            self.call_times.append(time.monotonic())
            refuse = self.calls <= self.failures
        if refuse:
            raise EncoderOverloaded("busy (test)", retry_after_s=self.retry_after_s)
        return self._backend.encode(prompts)


class GatedBackend:
    """The tiny backend, but every forward pass waits until the test opens the gate.

    A gate, not a fixed delay: on a loaded CI machine a 2 s sleep could run
    out before the test had looked at the stopping server.
    """

    def __init__(self, backend):
        self._backend = backend
        self.gate = threading.Event()
        self.seen: list[str] = []

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def encode(self, prompts):
        self.seen.extend(prompts)
        assert self.gate.wait(60), "the test never opened the gate"
        return self._backend.encode(prompts)


class Serialized(ProxyBackend):
    """One backend object shared by several in-process servers, one forward pass at a time.

    A server runs its backend on one model thread; two servers in one test
    process sharing one backend would otherwise call its Hugging Face fast
    tokenizer from two threads at once, which is not safe (its padding and
    truncation settings are per object).
    """

    _locks: dict[int, threading.Lock] = {}

    def encode(self, prompts):
        lock = Serialized._locks.setdefault(id(self._backend), threading.Lock())
        with lock:
            return super().encode(prompts)


# -- prompt upsampling ---------------------------------------------------------------


class Gate:
    """A stand-in generation that runs until released or stopped, checking ``should_stop`` like each token does."""

    def __init__(self):
        self.started = threading.Event()
        self.release = threading.Event()
        self.stopped = threading.Event()

    def __call__(self, should_stop):
        self.started.set()
        while not self.release.wait(0.01):
            if should_stop():
                self.stopped.set()
                raise GenerationStopped()
        return "done"


class GatedUpsampler(Upsampler):
    """An upsampler whose generation waits for ``gate``; it answers each prompt with its upper case."""

    def __init__(self, *, takes_images: bool = False):
        self.gate = Gate()
        self.processor = object() if takes_images else None
        self.no_images_reason = "no processor in this test"
        self.fingerprint = "flux2-dev:gated"
        self.calls: list[dict] = []

    def upsample(self, prompts, images=None, *, temperature=0.15, seed=None, should_stop=lambda: False):
        self.calls.append(dict(prompts=prompts, images=images, temperature=temperature, seed=seed))
        self.gate(should_stop)
        return UpsampledBatch(
            [p.upper() for p in prompts], [len(p) + 1 for p in prompts], [9] * len(prompts), seed or 5, 1, 2
        )
