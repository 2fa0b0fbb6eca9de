"""One user's misbehaviour must not make another user's call fail.

A greedy gRPC client that never reads its answers, a slowloris HTTP client,
a user probing the cache for another user's prompts, and a stop under load.
"""

from __future__ import annotations

import socket
import threading
import time

import grpc
import pytest
import requests

from common.config import AuthConfig, CacheConfig, HTTPConfig, Limits, ServerConfig
from common.errors import NotCached
from common.protocol import pb2, pb2_grpc
from dit_client.remote import RemoteTextEncoder
from tests.helpers import GatedBackend, ServerThread, wait_until

ALICE = "alice-key-0123456789abcdef"
BOB = "bob-key-0123456789abcdefgh"
CAROL = "carol-key-0123456789abcdef"


@pytest.fixture()
def keys_file(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text(f"alice:{ALICE}\nbob:{BOB}\ncarol:{CAROL}\n")
    path.chmod(0o600)
    return path


def bearer(key: str):
    return (("authorization", f"Bearer {key}"),)


def test_a_user_who_never_reads_holds_only_their_share_and_loses_it_after_the_write_timeout(tiny_backend, keys_file):
    config = ServerConfig(
        # 8 slots and three users: each may hold 2 (the automatic quarter).
        limits=Limits(max_concurrent_calls=8, write_timeout_s=1.0),
        auth=AuthConfig(api_key_file=str(keys_file)),
    )
    with ServerThread(tiny_backend, config) as s:
        admission, metrics = s.running.admission, s.running.metrics
        assert admission.max_calls_per_user == 2
        # float32 and 8 prompts: an answer far larger than HTTP/2 flow control lets through unread.
        big = pb2.EncodeRequest(prompts=[f"greedy {i}" for i in range(8)], dtype=pb2.DTYPE_FLOAT32)
        # Without BDP probing the client's flow-control window stays at 64 KiB,
        # as with FLUX.2-dev's 15.7 MB embeddings, where no window holds an answer.
        greedy_channel = grpc.insecure_channel(s.target, options=[("grpc.http2.bdp_probe", 0)])
        stub = pb2_grpc.TextEncoderStub(greedy_channel)
        greedy = [stub.Encode(big, metadata=bearer(ALICE), timeout=120) for _ in range(6)]  # never read

        def refused() -> float:
            return metrics.sample(
                "flux2_encoder_requests_total", {"method": "Encode", "status": "RESOURCE_EXHAUSTED", "user": "alice"}
            )

        try:
            # Alice gets her share, and no more.
            wait_until(lambda: refused() == 4, what="alice's calls past her share to be refused")
            # Bob is served while she holds it, or after it was taken from her.
            with RemoteTextEncoder(s.target, api_key=BOB, timeout=60) as enc:
                for i in range(3):
                    assert enc.encode([f"bob {i}"]).shape[:2] == (1, 512)
            # Her unread answers are cancelled after the write timeout and her slots freed.
            wait_until(lambda: not admission._slots_by_user.get("alice"), what="alice's slots to be freed")
            assert metrics.sample("flux2_encoder_write_timeouts_total", {"method": "Encode"}) == 2
            wait_until(lambda: admission.calls == 0, what="the cancelled calls to end on the server")
        finally:
            for call in greedy:
                call.cancel()
            greedy_channel.close()
        with RemoteTextEncoder(s.target, api_key=ALICE, timeout=60) as enc:
            assert enc.encode(["alice reads this time"]).shape[0] == 1


def test_an_explicit_per_user_share_is_reported_and_enforced(tiny_backend, keys_file):
    config = ServerConfig(
        limits=Limits(max_concurrent_calls=8, max_concurrent_calls_per_user=1),
        auth=AuthConfig(api_key_file=str(keys_file)),
    )
    with ServerThread(tiny_backend, config) as s:
        with RemoteTextEncoder(s.target, api_key=BOB) as enc:
            limits = enc.info().limits
        assert limits["max_concurrent_calls_per_user"] == 1
        assert limits["write_timeout_ms"] == 30_000


def slowloris(port: int, stop: threading.Event, opened: list) -> None:
    """A request whose body arrives one byte at a time, far slower than any real client."""
    body = b'{"prompt": "slow"}'
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    opened.append(sock)
    sock.sendall(
        f"POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    )
    for byte in body[:-1]:
        if stop.wait(0.3):
            return
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            return


def test_slow_http_bodies_hold_no_slot_and_time_out(tiny_backend, keys_file, caplog):
    config = ServerConfig(
        limits=Limits(max_concurrent_calls=4, body_timeout_s=1.5),
        auth=AuthConfig(api_key_file=str(keys_file)),
        http=HTTPConfig(port=0),
    )
    with ServerThread(tiny_backend, config) as s:
        port = s.running.http.port
        stop, opened = threading.Event(), []
        threads = [threading.Thread(target=slowloris, args=(port, stop, opened)) for _ in range(12)]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: len(opened) == 12, what="the slow connections")
            # Three times as many slow senders as slots, and bob is served at once.
            for i in range(5):
                reply = requests.post(
                    f"http://127.0.0.1:{port}/predict",
                    json={"prompt": f"bob {i}"},
                    headers={"Authorization": f"Bearer {BOB}"},
                    timeout=10,
                )
                assert reply.status_code == 200, reply.text
            # The slow senders never held a slot (bob's answers release theirs just after the reply).
            assert not s.running.admission._slots_by_user.get("alice")
            wait_until(lambda: s.running.admission._slots == 0, what="bob's slots to be released")
            # The slow senders are answered 408 once the body timeout passes.
            answer = opened[0].recv(4096)
            assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
        finally:
            stop.set()
            for t in threads:
                t.join(10)
            for sock in opened:
                sock.close()
        # Hanging up mid-body is the client's business: no server error is logged for it.
        assert "POST /predict failed" not in caplog.text


@pytest.mark.parametrize("scope, leaks", [("user", False), ("shared", True)])
def test_cache_scope_user_hides_other_users_prompts(tiny_backend, keys_file, scope, leaks):
    """Bob probes for a prompt of alice's: cache_only, the HTTP cache-hit header, and compute-once."""
    config = ServerConfig(
        auth=AuthConfig(api_key_file=str(keys_file)), cache=CacheConfig(scope=scope), http=HTTPConfig(port=0)
    )
    with ServerThread(tiny_backend, config) as s:
        assert s.running.engine.cache_scope == scope
        secret = "alice's secret prompt"
        with RemoteTextEncoder(s.target, api_key=BOB) as bob, RemoteTextEncoder(s.target, api_key=ALICE) as alice:
            assert bob.connection.get_info().cache_scope == scope  # GetInfo tells every user
            with pytest.raises(NotCached):
                bob.encode([secret], cache_only=True)
            alice.encode([secret])
            if leaks:
                assert bob.encode([secret], cache_only=True).shape[0] == 1
            else:
                with pytest.raises(NotCached):
                    bob.encode([secret], cache_only=True)
            # Alice's own repeat is still a hit.
            assert alice.encode([secret], cache_only=True).shape[0] == 1
        reply = requests.post(
            f"http://127.0.0.1:{s.running.http.port}/predict",
            json={"prompt": secret},
            headers={"Authorization": f"Bearer {CAROL}"},
            timeout=30,
        )
        assert reply.headers["X-Flux2-Cache-Hits"] == ("1" if leaks else "0")


def test_cache_scope_user_never_joins_another_users_computation(tiny_backend, keys_file):
    gated = GatedBackend(tiny_backend)
    config = ServerConfig(auth=AuthConfig(api_key_file=str(keys_file)))  # auto: three users -> "user"
    with ServerThread(gated, config) as s:
        assert s.running.engine.cache_scope == "user"
        results = {}

        def encode(user, key):
            with RemoteTextEncoder(s.target, api_key=key) as enc:
                results[user] = enc.encode_with_metadata(["the same prompt"])[1][0]

        threads = [threading.Thread(target=encode, args=(u, k)) for u, k in (("alice", ALICE), ("bob", BOB))]
        for t in threads:
            t.start()
        wait_until(lambda: len(gated.seen) + s.running.engine.queued >= 2, what="both requests to arrive")
        gated.gate.set()
        for t in threads:
            t.join(30)
        assert s.running.metrics.sample("flux2_encoder_prompts_computed_total") == 2
        assert not results["alice"].cache_hit and not results["bob"].cache_hit


def test_auto_scope_is_shared_without_keys(server):
    assert server.running.engine.cache_scope == "shared"


def test_http_answers_503_not_a_closed_port_while_grpc_drains(tiny_backend):
    gated = GatedBackend(tiny_backend)
    with ServerThread(gated, ServerConfig(http=HTTPConfig(port=0))) as s:
        url = f"http://127.0.0.1:{s.running.http.port}"
        result = {}

        def grpc_call():
            with RemoteTextEncoder(s.target) as enc:
                result["grpc"] = enc.encode("in flight over gRPC")

        t = threading.Thread(target=grpc_call)
        t.start()
        wait_until(lambda: gated.seen, what="the gRPC request to reach the model")
        stopping = s.call_soon(s.running.stop(60))
        try:
            wait_until(lambda: s.running.admission.closing, what="the drain to begin")
            # No HTTP request is in flight, yet the port stays open and says why.
            reply = requests.post(f"{url}/predict", json={"prompt": "late"}, timeout=10)
            assert reply.status_code == 503 and "shutting down" in reply.json()["error"]
            assert requests.get(f"{url}/health", timeout=10).status_code == 503
        finally:
            gated.gate.set()
        t.join(30)
        stopping.result(30)
        s.running = None
        assert result["grpc"].shape[:2] == (1, 512)


def test_calls_arriving_during_a_stop_get_unavailable_never_cancelled(tiny_backend):
    with ServerThread(tiny_backend) as s:
        codes: list[grpc.StatusCode] = []
        stop_clients = threading.Event()

        def client():
            with grpc.insecure_channel(s.target) as channel:
                stub = pb2_grpc.TextEncoderStub(channel)
                while not stop_clients.is_set() and len(codes) < 5000:
                    try:
                        list(stub.Encode(pb2.EncodeRequest(prompts=["p"]), timeout=10))
                        codes.append(grpc.StatusCode.OK)
                    except grpc.RpcError as err:
                        codes.append(err.code())
                        if err.code() == grpc.StatusCode.UNAVAILABLE:
                            if "shutting down" not in (err.details() or ""):
                                return  # the port is closed: nothing more to learn
                            # The back-off is the behaviour: a real client waits, or goes to another replica.
                            time.sleep(0.3)

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        wait_until(lambda: len(codes) > 20, what="the clients to get going")
        s.call(s.running.stop(10))
        s.running = None
        stop_clients.set()
        for t in threads:
            t.join(30)
        assert grpc.StatusCode.CANCELLED not in codes, codes.count(grpc.StatusCode.CANCELLED)
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}
