"""One client, several replicas: targets naming them all, round_robin, health checks, failover.

In-process servers on loopback (tests/helpers.py), so each replica's calls can be
counted and its health set by the test. Killing replicas with ``kill -9`` needs
processes: that is tests/encoder_server/test_replicas.py.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2

from common.errors import EncoderUnavailable
from common.protocol import SERVICE_NAME
from dit_client.connection import Connection, TargetError, can_name_several, parse_target
from dit_client.demo import free_port
from dit_client.remote import RemoteTextEncoder
from dit_client.retry import RetryPolicy
from tests.helpers import ProxyBackend, ServerThread, wait_until

PROMPTS = [f"prompt number {i}" for i in range(12)]


def ports_of(*servers: ServerThread) -> str:
    return ",".join(s.target for s in servers)


@pytest.fixture()
def three(tiny_backend):
    backends = [ProxyBackend(tiny_backend) for _ in range(3)]
    with ServerThread(backends[0]) as a, ServerThread(backends[1]) as b, ServerThread(backends[2]) as c:
        yield [a, b, c], backends


# -- targets ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "given,dialled",
    [
        ("10.0.0.1:50051,10.0.0.2:50052", "ipv4:10.0.0.1:50051,10.0.0.2:50052"),
        ("10.0.0.1, 10.0.0.2", "ipv4:10.0.0.1:50051,10.0.0.2:50051"),  # default port each, spaces allowed
        ("[::1]:7000,[::2]", "ipv6:[::1]:7000,[::2]:50051"),
        ("localhost:7000,localhost:7001", "ipv4:127.0.0.1:7000,127.0.0.1:7001"),  # names looked up once
        ("127.0.0.1:7000,", "ipv4:127.0.0.1:7000"),
    ],
)
def test_comma_lists_become_one_grpc_target(given, dialled):
    assert parse_target(given) == dialled


@pytest.mark.parametrize(
    "given,says",
    [
        ("10.0.0.1:50051,[::1]:50051", "mixes IPv4 and IPv6"),
        ("10.0.0.1:50051,http://b:1", "is a URL"),
        ("10.0.0.1:50051,b:99999", "outside 1-65535"),
        ("10.0.0.1:1,dns:///b:1", "cannot be part of a comma list"),
        ("a.invalid:1,b.invalid:2", "cannot look up"),
        (",", "names no address"),
    ],
)
def test_bad_comma_lists_are_refused_with_the_fix(given, says):
    with pytest.raises(TargetError, match=says):
        parse_target(given)


@pytest.mark.parametrize(
    "target,several",
    [
        ("gpu:50051", False),
        ("unix:/run/x.sock", False),
        ("ipv4:1.2.3.4:5", False),
        ("ipv4:1.2.3.4:5,1.2.3.4:6", True),
        ("dns:///gpu:50051", True),
        ("ipv6:[::1]:1,[::1]:2", True),
    ],
)
def test_round_robin_is_the_default_where_a_target_can_name_several(target, several):
    assert can_name_several(target) is several
    conn = Connection(target)  # no call is made: the channel connects lazily
    try:
        assert conn.lb_policy == ("round_robin" if several else "pick_first")
    finally:
        conn.close()


def test_lb_policy_is_checked_and_channel_options_reach_the_channel():
    with pytest.raises(TargetError, match="lb_policy"):
        Connection("127.0.0.1:1", lb_policy="random")
    conn = Connection(
        "127.0.0.1:1,127.0.0.1:2", lb_policy="pick_first", channel_options=[("grpc.primary_user_agent", "x")]
    )
    assert conn.lb_policy == "pick_first"
    conn.close()


# -- balancing and failover over real servers -----------------------------------------


def test_round_robin_spreads_calls_over_every_replica(three, tiny_backend):
    servers, backends = three
    with RemoteTextEncoder(ports_of(*servers)) as enc:
        assert enc.connection.lb_policy == "round_robin"
        for prompt in PROMPTS:
            enc.encode([prompt])
    # round_robin sends the calls in turn: every replica computed some (4 each once all are connected).
    assert sum(b.calls for b in backends) == len(PROMPTS)
    assert all(b.calls >= 2 for b in backends), [b.calls for b in backends]


def test_pick_first_sends_everything_to_one_replica(three):
    servers, backends = three
    with RemoteTextEncoder(ports_of(*servers), lb_policy="pick_first") as enc:
        for prompt in PROMPTS[:6]:
            enc.encode([prompt])
    assert sorted(b.calls for b in backends) == [0, 0, 6]


def test_a_replica_whose_health_says_not_serving_gets_no_calls(three):
    """Client-side health checking (healthCheckConfig in the service config) needs no extra
    channel option in grpcio: the subchannel watches grpc.health.v1 for the TextEncoder
    service, and round_robin skips it while it says NOT_SERVING."""
    servers, backends = three
    sick = servers[1]
    sick.call(sick.running.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING))
    with RemoteTextEncoder(ports_of(*servers)) as enc:
        for prompt in PROMPTS:
            enc.encode([prompt])
        assert backends[1].calls == 0 and backends[0].calls and backends[2].calls
        # Back to SERVING: it gets calls again, without a new client.
        sick.call(sick.running.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING))

        def recovered() -> bool:
            enc.encode([f"after recovery {time.monotonic()}"])
            return backends[1].calls > 0

        wait_until(recovered, timeout=20, what="the recovered replica to get a call")


def test_calls_keep_succeeding_while_replicas_stop(three, tiny_backend):
    servers, backends = three
    with RemoteTextEncoder(ports_of(*servers)) as enc:
        reference = {p: enc.encode([p]) for p in PROMPTS}
        servers[0].stop(0)
        for p in PROMPTS:
            assert torch.equal(enc.encode([p]), reference[p])
        servers[2].stop(0)
        for p in PROMPTS:
            assert torch.equal(enc.encode([p]), reference[p])
        assert enc.info(refresh=True).fingerprint


def test_all_replicas_down_fails_fast_with_the_usual_message():
    with RemoteTextEncoder(f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}", timeout=10) as enc:
        t0 = time.monotonic()
        with pytest.raises(EncoderUnavailable, match="cannot reach the encoder at ipv4:127.0.0.1"):
            enc.info()
        assert time.monotonic() - t0 < 8  # gRPC's few retries, then the error: no hang


def test_encode_stream_moves_to_a_live_replica_when_its_replica_stops(tiny_backend):
    """The stream's replica is stopped while requests are in flight: they are sent again on a new
    stream, which round_robin places on the other replica; every prompt comes back once."""
    gated = [GateWhenArmed(tiny_backend), GateWhenArmed(tiny_backend)]
    with ServerThread(gated[0]) as a, ServerThread(gated[1]) as b:
        with RemoteTextEncoder(ports_of(a, b), timeout=30) as enc:
            reference = {p: enc.encode([p]) for p in PROMPTS}  # 12 calls: both replicas warm, neither gated yet
            for g in gated:
                g.arm()
            results = []
            stream = enc.encode_stream(PROMPTS, batch_size=2, max_in_flight=3)
            done = threading.Event()

            def consume():
                results.extend((r.index, r.embedding.clone()) for r in stream)
                done.set()

            threading.Thread(target=consume, daemon=True).start()
            wait_until(lambda: any(g.waiting for g in gated), what="the stream's replica to hold a request")
            holder = next(i for i, g in enumerate(gated) if g.waiting)
            other = gated[1 - holder]
            other.gate.set()  # the other replica answers everything it gets
            # The stream's replica goes away with requests in flight (stop() waits for the
            # gated forward pass, so it runs on a thread and the gate opens once it began).
            running = [a, b][holder].running
            stopping = threading.Thread(target=[a, b][holder].stop, args=(0,))
            stopping.start()
            wait_until(lambda: running.admission.closing, what="the stop to begin")
            gated[holder].gate.set()
            stopping.join(30)
            assert done.wait(30), "the stream never finished"
    assert sorted(i for i, _ in results) == list(range(len(PROMPTS)))  # each prompt once, none lost
    for i, embedding in results:
        assert torch.equal(embedding, reference[PROMPTS[i]][0])


class GateWhenArmed(ProxyBackend):
    """Once armed, every forward pass waits for ``gate`` (``waiting`` is set when one does).

    The two replicas share one model object, whose fast tokenizer must not run in two
    threads at once: the forward passes themselves take turns (``_one_at_a_time``).
    """

    _one_at_a_time = threading.Lock()

    def __init__(self, backend):
        super().__init__(backend)
        self.gate = threading.Event()
        self.armed = False
        self.waiting = False

    def arm(self) -> None:
        self.armed = True

    def encode(self, prompts):
        if self.armed:
            self.waiting = True
            self.gate.wait(30)
        with self._one_at_a_time:
            return super().encode(prompts)


# -- an answer that breaks off part-way: gRPC cannot retry it, the client does -----------


class BreaksOff:
    """A gRPC front for a real server whose first ``breaks`` Encode calls send one message, then fail UNAVAILABLE.

    That is what a replica dying mid-answer looks like to the client: the call is
    committed (its response headers arrived), so gRPC's retry policy does not apply.
    """

    def __init__(self, upstream: str, breaks: int):
        self.upstream = grpc.insecure_channel(upstream)
        self.breaks = breaks
        self.calls = 0
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        handlers = {
            "GetInfo": grpc.unary_unary_rpc_method_handler(self.get_info),
            "Encode": grpc.unary_stream_rpc_method_handler(self.encode),
        }
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def get_info(self, request: bytes, context):
        return self.upstream.unary_unary(f"/{SERVICE_NAME}/GetInfo")(request)

    def encode(self, request: bytes, context):
        self.calls += 1
        for i, frame in enumerate(self.upstream.unary_stream(f"/{SERVICE_NAME}/Encode")(request)):
            if self.calls <= self.breaks and i == 1:
                context.abort(grpc.StatusCode.UNAVAILABLE, "replica went away (test)")
            yield frame

    def close(self):
        self.server.stop(0)
        self.upstream.close()


def test_an_answer_broken_off_part_way_is_sent_again(server):
    front = BreaksOff(server.target, breaks=1)
    try:
        with RemoteTextEncoder(server.target) as direct:
            expected = direct.encode(["a red fox", "a blue owl"])
        with RemoteTextEncoder(f"127.0.0.1:{front.port}", retry=RetryPolicy(initial_backoff_s=0.01)) as enc:
            assert torch.equal(enc.encode(["a red fox", "a blue owl"]), expected)
        assert front.calls == 2  # gRPC did not retry the committed call; the client sent it once more
    finally:
        front.close()


def test_a_broken_answer_is_raised_once_the_policy_gives_up(server):
    front = BreaksOff(server.target, breaks=10**6)
    try:
        with (
            RemoteTextEncoder(
                f"127.0.0.1:{front.port}", retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.01)
            ) as enc,
            pytest.raises(EncoderUnavailable, match="broke off 3 times"),
        ):
            enc.encode(["a red fox", "a blue owl"])
        assert front.calls == 3
    finally:
        front.close()


def test_flux2_dit_commands_take_the_same_targets(three, tmp_path, capsys):
    from dit_client import cli

    servers, backends = three
    assert cli.main(["info", "--encoder", ports_of(*servers)]) == 0
    names = ",".join(s.target.replace("127.0.0.1", "localhost") for s in servers)  # names, looked up once
    out = tmp_path / "fox.safetensors"
    assert cli.main(["encode", "--encoder", names, "--prompt", "a red fox", "--out", str(out)]) == 0
    assert out.is_file() and sum(b.calls for b in backends) == 1
    assert cli.main(["info", "--encoder", f"dns:///localhost:{servers[0].running.port}"]) == 0
    capsys.readouterr()
