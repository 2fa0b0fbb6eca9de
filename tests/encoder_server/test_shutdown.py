"""Graceful shutdown: NOT_SERVING first, in-flight work drains within the grace period, a second signal exits at once.

The signal tests run the real CLI (``python -m encoder_server.cli serve --model demo``)
in a subprocess, because signal handling is exactly what an in-process server cannot show.
"""

from __future__ import annotations

import asyncio
import queue
import signal
import threading
import time

import grpc
import pytest
import requests
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.config import HTTPConfig, ServerConfig
from common.errors import Cancelled, EncoderUnavailable
from common.protocol import SERVICE_NAME, pb2, pb2_grpc
from dit_client.remote import RemoteTextEncoder
from tests.helpers import GatedBackend, ServerThread, wait_until
from tests.replica_procs import ReplicaProcess

_DONE = object()


class OpenStream:
    """An EncodeStream the test feeds one request at a time, read on a background thread."""

    def __init__(self, channel: grpc.Channel):
        self._requests: queue.Queue = queue.Queue()
        self.done: queue.Queue = queue.Queue()  # request ids as they complete, then the final status
        stub = pb2_grpc.TextEncoderStub(channel)
        self._call = stub.EncodeStream(iter(self._requests.get, _DONE), timeout=120)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for msg in self._call:
                if msg.request_done:
                    self.done.put(msg.request_id)
            self.done.put(grpc.StatusCode.OK)
        except grpc.RpcError as err:
            self.done.put(err.code())

    def send(self, request_id: str) -> None:
        self._requests.put(pb2.EncodeRequest(request_id=request_id, prompts=[f"prompt {request_id}"]))

    def close_requests(self) -> None:
        self._requests.put(_DONE)

    def next(self, timeout: float = 30.0):
        return self.done.get(timeout=timeout)


class HealthWatch:
    """Statuses a grpc.health.v1 Watch reports, as a load balancer would see them."""

    def __init__(self, channel: grpc.Channel):
        self.statuses: queue.Queue = queue.Queue()
        self._call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for reply in self._call:
                self.statuses.put(reply.status)
        except grpc.RpcError:
            pass

    def wait_for(self, status, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.statuses.get(timeout=max(0.01, deadline - time.monotonic())) == status:
                    return
            except queue.Empty:
                break
        pytest.fail(f"health never reported {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}")


@pytest.fixture()
def channel_to():
    channels = []

    def make(target):
        channels.append(grpc.insecure_channel(target))
        return channels[-1]

    yield make
    for c in channels:
        c.close()


@pytest.mark.slow  # a server process and its signals
def test_sigterm_reports_not_serving_drains_in_flight_work_and_exits_zero(tmp_path, channel_to):
    server = ReplicaProcess(tmp_path, grace_s=30).start()
    try:
        channel = channel_to(server.target)
        watch = HealthWatch(channel)
        watch.wait_for(health_pb2.HealthCheckResponse.SERVING)
        stream = OpenStream(channel)
        stream.send("before")
        assert stream.next() == "before"

        t_signal = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        watch.wait_for(health_pb2.HealthCheckResponse.NOT_SERVING)

        # New calls are refused while the open stream is still served.
        with RemoteTextEncoder(server.target, timeout=10) as fresh, pytest.raises((EncoderUnavailable, Cancelled)):
            fresh.encode("new call")
        stream.send("during drain")
        assert stream.next() == "during drain"
        assert server.proc.poll() is None

        stream.close_requests()
        assert stream.next() == grpc.StatusCode.OK
        assert server.exit_code(20) == 0
        # Nothing was in flight any more, so it did not sit out the 30 s grace.
        assert time.monotonic() - t_signal < 25
        assert "draining in-flight work" in server.log() and "stopped" in server.log()
    finally:
        server.close()


@pytest.mark.slow  # a server process and its signals
def test_grace_period_bounds_the_drain(tmp_path, channel_to):
    server = ReplicaProcess(tmp_path, grace_s=2).start()
    try:
        stream = OpenStream(channel_to(server.target))
        stream.send("0")
        assert stream.next() == "0"
        t_signal = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        # The client never finishes its stream; the server cuts it at the end of the grace.
        assert server.exit_code(20) == 0
        assert 1.5 < time.monotonic() - t_signal < 15
        assert stream.next() != grpc.StatusCode.OK
    finally:
        server.close()


@pytest.mark.slow  # a server process and its signals
def test_second_signal_exits_at_once(tmp_path, channel_to):
    server = ReplicaProcess(tmp_path, grace_s=120).start()
    try:
        channel = channel_to(server.target)
        watch = HealthWatch(channel)
        stream = OpenStream(channel)
        stream.send("0")
        assert stream.next() == "0"
        server.proc.send_signal(signal.SIGTERM)
        watch.wait_for(health_pb2.HealthCheckResponse.NOT_SERVING)
        # What is tested is that nothing happens (the server does not exit): time must pass to show it.
        time.sleep(1.0)
        assert server.proc.poll() is None, "the first signal must wait for the open stream"
        t_second = time.monotonic()
        server.proc.send_signal(signal.SIGINT)
        assert server.exit_code(10) != 0
        assert time.monotonic() - t_second < 5
        assert "second signal" in server.log()
    finally:
        server.close()


# -- in process: HTTP and gRPC requests in flight during stop() -----------


def test_stop_lets_http_and_grpc_requests_finish_and_refuses_new_http_with_503(tiny_backend):
    gated = GatedBackend(tiny_backend)
    with ServerThread(gated, ServerConfig(http=HTTPConfig(port=0))) as s:
        url = f"http://127.0.0.1:{s.running.http.port}"
        with RemoteTextEncoder(s.target) as enc:
            enc.info()
            results: dict[str, object] = {}

            def grpc_call():
                results["grpc"] = enc.encode("in flight over gRPC")

            def http_call():
                results["http"] = requests.post(f"{url}/predict", json={"prompt": "in flight over HTTP"}, timeout=60)

            threads = [threading.Thread(target=grpc_call), threading.Thread(target=http_call)]
            for t in threads:
                t.start()
            # Both requests must be inside the server before the stop begins:
            # one forward pass holding both, or one running and one queued.
            wait_until(
                lambda: len(gated.seen) == 2 or (len(gated.seen) == 1 and s.running.engine.queued == 1),
                what="both requests to reach the engine",
            )
            stopping = asyncio.run_coroutine_threadsafe(s.running.stop(60), s.loop)
            try:
                wait_until(
                    lambda: requests.get(f"{url}/health", timeout=5).status_code == 503,
                    timeout=10,
                    what="/health to say 503 (NOT_SERVING)",
                )
                late = requests.post(f"{url}/predict", json={"prompt": "too late"}, timeout=10)
                assert late.status_code == 503 and "shutting down" in late.json()["error"]
                assert not stopping.done(), "the stop must wait for the requests in flight"
            finally:
                gated.gate.set()
            for t in threads:
                t.join(60)
            stopping.result(60)
            s.running = None  # already stopped
        assert isinstance(results["grpc"], torch.Tensor) and results["grpc"].shape[:2] == (1, 512)
        assert results["http"].status_code == 200
        assert "too late" not in gated.seen


def test_open_health_watchers_do_not_hold_the_drain(tiny_backend):
    """grpc.aio's stop(grace) alone would wait the whole grace for a Watch stream that never ends."""
    with ServerThread(tiny_backend) as s, grpc.insecure_channel(s.target) as channel:
        watch = HealthWatch(channel)
        watch.wait_for(health_pb2.HealthCheckResponse.SERVING)
        t0 = time.monotonic()
        s.call(s.running.stop(20))
        s.running = None
        assert time.monotonic() - t0 < 5
        watch.wait_for(health_pb2.HealthCheckResponse.NOT_SERVING)
