"""API keys file, constant-time key check, the auth interceptor and per-user limits."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.config import AuthConfig, ServerConfig
from common.errors import RETRY_AFTER_METADATA, EncoderOverloaded, Unauthenticated
from common.protocol import SERVICE_NAME, pb2, pb2_grpc
from dit_client.remote import RemoteTextEncoder
from encoder_server import auth
from encoder_server.admission import ENCODE_STREAM, Admission, Ticket
from encoder_server.auth import Authenticator, KeyFileError, KeyStore, load_api_keys, parse_bearer
from encoder_server.identity import ANONYMOUS, current_user
from encoder_server.interceptor import PolicyInterceptor
from encoder_server.metrics import EncoderMetrics
from encoder_server.usage import QuotaExhausted, RateLimited, UsageLimiter
from tests.helpers import ServerThread

ALICE_KEY = "alice-key-0123456789abcdef"
BOB_KEY = "bob-key-0123456789abcdefgh"


def write_keys(tmp_path, text: str, name: str = "keys.txt"):
    path = tmp_path / name
    path.write_text(text)
    os.chmod(path, 0o600)
    return path


@pytest.fixture()
def keys_file(tmp_path):
    return write_keys(tmp_path, f"# studio keys\n\nalice:{ALICE_KEY}\n  # indented comment\nbob:{BOB_KEY}\n")


# -- keys file -----------------------------------------------------------


def test_keys_file_parses_users_comments_and_blank_lines(keys_file):
    assert load_api_keys(keys_file) == {"alice": ALICE_KEY, "bob": BOB_KEY}


def test_key_may_contain_colons_and_hashes(tmp_path):
    path = write_keys(tmp_path, "ci-bot:abc:def#ghi0123456789xyz\n")
    assert load_api_keys(path) == {"ci-bot": "abc:def#ghi0123456789xyz"}


@pytest.mark.parametrize(
    "text, message",
    [
        ("alice\n", "line 1: expected 'user:key'"),
        (f"# c\n:{ALICE_KEY}\n", "line 2: user name ''"),
        (f"al ice:{ALICE_KEY}\n", "user name 'al ice'"),
        ("alice:\n", "empty key"),
        ("alice:short\n", "use at least 16"),
        (f"alice:{ALICE_KEY} # laptop\n", "without spaces"),
        (f"alice:{ALICE_KEY}\nalice:{BOB_KEY}\n", "line 2: user 'alice' appears twice"),
        (f"alice:{ALICE_KEY}\nbob:{ALICE_KEY}\n", "same key as 'alice'"),
        ("# only comments\n\n", "holds no 'user:key' line"),
        ("alice:ключ-0123456789abcdef\n", "printable ASCII"),
    ],
)
def test_malformed_keys_file_is_refused_with_the_line(tmp_path, text, message):
    path = write_keys(tmp_path, text)
    with pytest.raises(KeyFileError, match=message) as info:
        load_api_keys(path)
    assert str(path) in str(info.value)


def test_missing_keys_file_is_a_clear_error(tmp_path):
    with pytest.raises(KeyFileError, match="does not exist"):
        load_api_keys(tmp_path / "nope.txt")


def test_world_readable_keys_file_warns(tmp_path, caplog):
    path = write_keys(tmp_path, f"alice:{ALICE_KEY}\n")
    os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING, logger="encoder_server.auth"):
        load_api_keys(path)
    assert "chmod 600" in caplog.text


def test_key_store_compares_every_key_in_constant_time(monkeypatch, keys_file):
    store = KeyStore.from_file(keys_file)
    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    assert store.user_for(ALICE_KEY) == "alice"
    # The first key matched, yet the second was compared too; all digests are 32 bytes.
    assert calls == [(32, 32), (32, 32)]
    calls.clear()
    assert store.user_for("x") is None
    assert store.user_for(ALICE_KEY + "x") is None
    assert len(calls) == 4


@pytest.mark.parametrize("header", ["Bearer k1", "bearer k1", "BEARER   k1  "])
def test_parse_bearer_accepts_the_scheme_in_any_case(header):
    assert parse_bearer(header) == "k1"


@pytest.mark.parametrize(
    "header, message",
    [
        (None, "needs an API key"),
        ("", "needs an API key"),
        ("k1", "malformed"),
        ("Basic k1", "malformed"),
        ("Bearer", "malformed"),
        ("Bearer a b", "malformed"),
    ],
)
def test_parse_bearer_refuses_missing_or_malformed(header, message):
    with pytest.raises(Unauthenticated, match=message):
        parse_bearer(header)


def test_authenticator_without_keys_makes_everyone_anonymous():
    assert Authenticator(None).authenticate(None) == ANONYMOUS
    assert Authenticator(None).authenticate("Bearer None") == ANONYMOUS


# -- limits --------------------------------------------------------------


class FakeClock:
    def __init__(self, mono: float = 1000.0, wall: float = 1_767_225_600.0):  # 2026-01-01 00:00 UTC
        self.mono, self.wall = mono, wall

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


def limiter(rpm=0, per_day=0, clock=None, state_file=None):
    clock = clock or FakeClock()
    lim = UsageLimiter(rpm, per_day, clock=lambda: clock.mono, wall_clock=lambda: clock.wall, state_file=state_file)
    return lim, clock


def test_rate_limit_bursts_then_refills_per_user():
    lim, clock = limiter(rpm=3)
    for _ in range(3):
        lim.take_request("alice")
    with pytest.raises(RateLimited, match="3 requests per minute") as info:
        lim.take_request("alice")
    assert info.value.retry_after_s == pytest.approx(20.0)
    assert isinstance(info.value, EncoderOverloaded)  # -> RESOURCE_EXHAUSTED
    lim.take_request("bob")  # another user's bucket is full
    clock.advance(20.0)
    lim.take_request("alice")
    with pytest.raises(RateLimited):
        lim.take_request("alice")


def test_daily_quota_counts_prompts_and_resets_at_utc_midnight():
    lim, clock = limiter(per_day=5)
    lim.reserve("alice", 3)
    with pytest.raises(QuotaExhausted, match="used 3 of 5 prompts today") as info:
        lim.reserve("alice", 3)
    lim.reserve("alice", 2)  # a refused request charged nothing
    with pytest.raises(QuotaExhausted):
        lim.reserve("alice", 1)
    clock.advance(3600.0)
    with pytest.raises(QuotaExhausted) as info:
        lim.reserve("alice", 1)
    assert info.value.retry_after_s == pytest.approx(23 * 3600.0)
    clock.advance(23 * 3600.0)
    lim.reserve("alice", 5)


def test_daily_counts_survive_a_restart_through_the_usage_file(tmp_path):
    state = tmp_path / "usage.json"
    lim, clock = limiter(per_day=5, state_file=state)
    assert not lim.save()  # nothing counted yet: nothing written
    lim.reserve("alice", 4)
    lim.reserve("bob", 1)
    assert lim.save() and not lim.save()  # written once, then nothing new
    assert json.loads(state.read_text())["prompts_today"] == {"alice": 4, "bob": 1}

    restarted, _ = limiter(per_day=5, clock=clock, state_file=state)
    with pytest.raises(QuotaExhausted, match="used 4 of 5 prompts today"):
        restarted.reserve("alice", 2)
    restarted.reserve("alice", 1)

    clock.advance(24 * 3600.0)  # the next UTC day: yesterday's file counts for nothing
    next_day, _ = limiter(per_day=5, clock=clock, state_file=state)
    next_day.reserve("alice", 5)


def test_a_usage_file_the_server_did_not_write_is_refused_with_a_clear_error(tmp_path):
    state = tmp_path / "usage.json"
    state.write_text("{not json")
    with pytest.raises(auth.ConfigError, match="is not one this server wrote.*move it away"):
        limiter(per_day=5, state_file=state)


def test_server_keeps_the_quota_across_a_restart(tiny_backend, keys_file, tmp_path):
    config = ServerConfig(
        auth=AuthConfig(api_key_file=str(keys_file), quota_prompts_per_day=3, usage_file=str(tmp_path / "usage.json"))
    )
    with ServerThread(tiny_backend, config) as s, RemoteTextEncoder(s.target, api_key=ALICE_KEY) as enc:
        enc.encode(["a", "b"])
    # stop() wrote the counts; a new server reads them back.
    with ServerThread(tiny_backend, config) as s, RemoteTextEncoder(s.target, api_key=ALICE_KEY) as enc:
        with pytest.raises(EncoderOverloaded, match="used 2 of 3 prompts today"):
            enc.encode(["c", "d"])
        enc.encode("c")


def test_request_larger_than_the_whole_quota_says_so():
    lim, _ = limiter(per_day=4)
    with pytest.raises(QuotaExhausted, match="at most 4 prompts"):
        lim.reserve("alice", 5)


def test_a_refund_gives_the_prompts_back_once():
    lim, _ = limiter(per_day=5)
    held = lim.reserve("alice", 4)
    with pytest.raises(QuotaExhausted):
        lim.reserve("alice", 2)
    held.refund()
    held.refund()  # a second refund gives nothing more back
    assert lim.used_today("alice") == 0
    lim.reserve("alice", 5)
    with pytest.raises(QuotaExhausted):
        lim.reserve("alice", 1)


def test_a_refund_from_yesterday_leaves_today_alone():
    lim, clock = limiter(per_day=5)
    held = lim.reserve("alice", 3)
    clock.advance(24 * 3600.0)
    lim.reserve("alice", 2)
    held.refund()
    assert lim.used_today("alice") == 2


def test_negative_limits_are_a_config_error():
    with pytest.raises(auth.ConfigError):
        UsageLimiter(-1, 0)


class _NoDeadline:
    def time_remaining(self):
        return None


def test_stream_over_its_rate_is_paced_not_failed(monkeypatch):
    """EncodeStream requests past the rate wait for a token (backpressure) instead of failing."""
    import encoder_server.interceptor as interceptor_module
    from common.config import Limits

    lim, clock = limiter(rpm=2)
    admission = Admission(Authenticator(None), lim, Limits(), EncoderMetrics())
    slept: list[float] = []

    async def fake_sleep(seconds):
        slept.append(seconds)
        clock.advance(seconds)

    async def requests():
        for i in range(4):
            yield pb2.EncodeRequest(prompts=[f"p{i}"])

    open_tickets: dict = {}

    async def run():
        slot = admission.acquire_slot("alice")
        admitted = PolicyInterceptor(admission)._admitted(
            requests(), _NoDeadline(), ENCODE_STREAM, "alice", slot, stopped=[], open_tickets=open_tickets
        )
        return [t async for t in admitted]

    monkeypatch.setattr(interceptor_module.asyncio, "sleep", fake_sleep)
    tickets = asyncio.run(run())
    assert [t.prompts for t in tickets] == [["p0"], ["p1"], ["p2"], ["p3"]]
    assert all(isinstance(t, Ticket) for t in tickets)
    assert slept == [pytest.approx(30.0), pytest.approx(30.0)]
    # A stream keeps a ticket only until the servicer releases it: a bulk job's answered requests are let go.
    assert len(open_tickets) == 4
    for t in tickets:
        t.release()
    assert not open_tickets


# -- over gRPC -----------------------------------------------------------


@pytest.fixture()
def keyed_server(tiny_backend, keys_file):
    config = ServerConfig(auth=AuthConfig(api_key_file=str(keys_file)))
    with ServerThread(tiny_backend, config, model_id="tiny-test") as s:
        yield s


def spy_on_users(server: ServerThread) -> list[tuple[str, str]]:
    """Record (user argument, current_user) of every engine.encode call."""
    seen: list[tuple[str, str]] = []
    engine = server.running.engine
    real = engine.encode

    async def spy(prompts, **kwargs):
        seen.append((kwargs.get("user"), current_user.get()))
        return await real(prompts, **kwargs)

    engine.encode = spy
    return seen


def raw_encode(target: str, metadata, prompts=("a fox",)) -> grpc.StatusCode:
    with grpc.insecure_channel(target) as channel:
        stub = pb2_grpc.TextEncoderStub(channel)
        try:
            for _ in stub.Encode(pb2.EncodeRequest(prompts=list(prompts)), metadata=metadata, timeout=30):
                pass
        except grpc.RpcError as err:
            return err.code(), err.details()
    return grpc.StatusCode.OK, ""


def test_missing_wrong_and_malformed_keys_are_unauthenticated(keyed_server):
    target = keyed_server.target
    code, details = raw_encode(target, ())
    assert code == grpc.StatusCode.UNAUTHENTICATED and "needs an API key" in details
    code, details = raw_encode(target, (("authorization", "Bearer " + "x" * 26),))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "not recognised" in details
    code, details = raw_encode(target, (("authorization", ALICE_KEY),))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "malformed" in details
    code, details = raw_encode(target, (("authorization", f"Bearer {ALICE_KEY}"), ("authorization", "Bearer x")))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "exactly one" in details
    # The client library turns it into its own exception, GetInfo included.
    with RemoteTextEncoder(target, api_key="wrong-key-0123456789abc") as enc, pytest.raises(Unauthenticated):
        enc.info()
    # And the server still serves a good key after all that.
    assert raw_encode(target, (("authorization", f"Bearer {ALICE_KEY}"),))[0] == grpc.StatusCode.OK


def test_user_name_reaches_the_engine(keyed_server):
    seen = spy_on_users(keyed_server)
    with RemoteTextEncoder(keyed_server.target, api_key=ALICE_KEY) as enc:
        embeds = enc.encode(["a red fox", "snow"])
    with RemoteTextEncoder(keyed_server.target, api_key=BOB_KEY) as enc:
        enc.encode("a red fox")
    assert embeds.shape[:2] == (2, 512)
    assert seen == [("alice", "alice"), ("bob", "bob")]


def test_user_name_reaches_the_engine_on_streams(keyed_server):
    seen = spy_on_users(keyed_server)
    requests = [pb2.EncodeRequest(request_id=str(i), prompts=[f"p{i}"]) for i in range(3)]
    with grpc.insecure_channel(keyed_server.target) as channel:
        stub = pb2_grpc.TextEncoderStub(channel)
        done = [
            m.request_id
            for m in stub.EncodeStream(iter(requests), metadata=(("authorization", f"Bearer {BOB_KEY}"),), timeout=30)
            if m.request_done
        ]
    assert sorted(done) == ["0", "1", "2"]
    assert seen == [("bob", "bob")] * 3


def test_health_and_reflection_stay_open_without_a_key(keyed_server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(keyed_server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(
            stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        )
        names = {s.name for s in replies[0].list_services_response.service}
        assert SERVICE_NAME in names


def test_rate_limit_over_grpc_is_resource_exhausted_with_retry_hint(tiny_backend, keys_file, caplog):
    config = ServerConfig(auth=AuthConfig(api_key_file=str(keys_file), rate_limit_rpm=2))
    with ServerThread(tiny_backend, config) as s:
        with RemoteTextEncoder(s.target, api_key=ALICE_KEY) as enc:
            enc.info()
            enc.info(refresh=True)  # GetInfo is not metered
            enc.encode("one")
            enc.encode("two")
            with (
                caplog.at_level(logging.INFO, logger="encoder_server.admission"),
                pytest.raises(EncoderOverloaded, match="2 requests per minute") as refused,
            ):
                enc.encode("three")
            assert 0 < refused.value.retry_after_s <= 30  # the client read the server's hint
        assert "Encode refused for user alice" in caplog.text
        md = (("authorization", f"Bearer {ALICE_KEY}"),)
        with grpc.insecure_channel(s.target) as channel:
            call = pb2_grpc.TextEncoderStub(channel).Encode(pb2.EncodeRequest(prompts=["x"]), metadata=md, timeout=10)
            with pytest.raises(grpc.RpcError) as info:
                list(call)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            retry_ms = dict(info.value.trailing_metadata())[RETRY_AFTER_METADATA]
            assert 1 <= int(retry_ms) <= 30_000
        with RemoteTextEncoder(s.target, api_key=BOB_KEY) as enc:
            assert enc.encode("bob is fine").shape[0] == 1


def test_daily_quota_over_grpc_refuses_unary_and_stops_streams(tiny_backend, keys_file):
    config = ServerConfig(auth=AuthConfig(api_key_file=str(keys_file), quota_prompts_per_day=3))
    with ServerThread(tiny_backend, config) as s:
        with RemoteTextEncoder(s.target, api_key=ALICE_KEY) as enc:
            enc.encode(["a", "b"])
            with pytest.raises(EncoderOverloaded, match="used 2 of 3 prompts today"):
                enc.encode(["c", "d"])
        md = (("authorization", f"Bearer {BOB_KEY}"),)
        requests = [pb2.EncodeRequest(request_id=str(i), prompts=["p"] * n) for i, n in enumerate([1, 2, 1])]
        received = []
        with grpc.insecure_channel(s.target) as channel:
            stub = pb2_grpc.TextEncoderStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                for m in stub.EncodeStream(iter(requests), metadata=md, timeout=30):
                    if m.request_done:
                        received.append(m.request_id)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "prompts today" in info.value.details()
        assert sorted(received) == ["0", "1"]
        # The streaming client stops at once: the quota comes back at midnight, not in a few retries.
        with RemoteTextEncoder(s.target, api_key=BOB_KEY) as enc:
            t0 = time.monotonic()
            with pytest.raises(EncoderOverloaded, match="prompts today.*asks to retry in"):
                list(enc.encode_stream(["more"]))
            assert time.monotonic() - t0 < 10
        # The server keeps serving other users.
        with RemoteTextEncoder(s.target, api_key=ALICE_KEY) as enc:
            assert enc.encode("c").shape[0] == 1


def test_no_keys_file_means_anonymous_users(server):
    seen = spy_on_users(server)
    with RemoteTextEncoder(server.target, api_key="ignored-without-keys-file") as enc:
        enc.encode("x")
    assert seen == [(ANONYMOUS, ANONYMOUS)]


def test_cli_refuses_a_bad_keys_file_before_loading_the_model(tmp_path, capsys):
    from encoder_server.cli import EXIT_CONFIG, main

    bad = write_keys(tmp_path, "alice\n")
    # A model that does not exist would fail later with another message.
    code = main(["serve", "--model", str(tmp_path / "no-model"), "--api-key-file", str(bad), "--port", "0"])
    assert code == EXIT_CONFIG
    assert "expected 'user:key'" in capsys.readouterr().err


def test_user_log_filter_names_the_caller():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "msg", None, None)
    token = current_user.set("alice")
    try:
        auth.UserLogFilter().filter(record)
    finally:
        current_user.reset(token)
    assert record.user == "alice"
    auth.UserLogFilter().filter(record)
    assert record.user == "-"  # outside a request nobody is the caller


def test_cli_flags_fill_the_auth_config():
    from encoder_server.cli import build_parser, config_from_args

    args = build_parser().parse_args(
        [
            "serve",
            "--api-key-file",
            "k.txt",
            "--rate-limit-rpm",
            "60",
            "--quota-prompts-per-day",
            "10000",
            "--usage-file",
            "/var/lib/u.json",
        ]
    )
    assert config_from_args(args).auth == AuthConfig(
        api_key_file="k.txt", rate_limit_rpm=60, quota_prompts_per_day=10000, usage_file="/var/lib/u.json"
    )
    assert config_from_args(build_parser().parse_args(["serve"])).auth == AuthConfig()
