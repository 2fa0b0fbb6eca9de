"""The transport layer of the client: target, TLS, channel, stubs, metadata, error translation.

Nothing here knows about embeddings; :mod:`dit_client.frames` reads the
messages and :mod:`dit_client.remote` / :mod:`dit_client.stream` build the
clients on top. Every mistake a person can make in ``--encoder`` or the TLS
flags is caught here, before gRPC's core sees it (it would print log lines
and dial the wrong port), and every transport failure comes back as one
:class:`common.errors.Flux2RemoteError` whose message names the likely fix.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from common.errors import EncoderUnavailable, Flux2RemoteError, error_from_code, retry_after_from_metadata
from common.protocol import SERVICE_NAME, pb2, pb2_grpc

DEFAULT_PORT = 50051
DEFAULT_TIMEOUT_S = 300.0
# Large responses come as 1 MiB chunks; allow some slack for headers.
MAX_RECEIVE_BYTES = 8 * 1024 * 1024

# gRPC name-resolver schemes (https://grpc.github.io/grpc/core/md_doc_naming.html) are passed
# through untouched: whoever writes ``dns:///host:port`` or ``ipv4:a:p,b:p`` chose gRPC's syntax on purpose.
GRPC_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:", "google-c2p:")
URL_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
LB_POLICIES = ("round_robin", "pick_first")
# gRPC caps maxAttempts at 5 (the first try included).
GRPC_RETRY_ATTEMPTS = 5


class TargetError(ValueError):
    """An ``--encoder`` value that cannot name a gRPC server (a usage error: exit code 2)."""


class TLSUsageError(ValueError):
    """TLS settings that do not go together, e.g. a client certificate without its key."""


def parse_target(target: str) -> str:
    """The gRPC target for an ``--encoder`` value, or :class:`TargetError` naming the fix.

    - ``host:port``, ``1.2.3.4:port`` and ``[::1]:port`` are checked (port 1-65535);
    - ``host`` or ``[::1]`` alone gets the server's default port, 50051 (gRPC itself would dial 443);
    - gRPC URI schemes (``dns:///host:port``, ``ipv4:a:p,b:p``, ``unix:`` ...) are passed through;
    - a comma list of addresses (replicas) becomes one gRPC target: ``ipv4:a:p,b:p`` for IPv4
      literals, ``ipv6:[a]:p,[b]:p`` for IPv6 literals; host names are looked up once, here
      (gRPC has no target naming several DNS names; see :func:`_resolve_names`);
    - URLs (``http://host:port``), empty values and bad ports are refused.
    """
    if not isinstance(target, str) or not target.strip():
        raise TargetError(f"the encoder address is empty; give HOST:PORT of the gRPC port (default {DEFAULT_PORT})")
    text = target.strip()
    if text.startswith(GRPC_SCHEMES):
        return text
    if "," not in text:
        host, port = _parse_address(text, target)
        return f"{host}:{port}"
    addresses = [_parse_address(part.strip(), target) for part in text.split(",") if part.strip()]
    if not addresses:
        raise TargetError(f"--encoder {target!r} names no address; e.g. host-a:{DEFAULT_PORT},host-b:{DEFAULT_PORT}")
    return _address_list_target(addresses, target)


def _parse_address(text: str, target: str) -> tuple[str, int]:
    """``(host, port)`` of one ``host[:port]`` (``[v6]`` keeps its brackets), or :class:`TargetError`."""
    if not text:
        raise TargetError(f"--encoder {target!r} has an empty address in its list")
    if text.startswith(GRPC_SCHEMES):
        raise TargetError(
            f"--encoder {target!r}: a gRPC URI ({text.split(':', 1)[0]}:) cannot be part of a "
            f"comma list; write the list as host:port,host:port or as one ipv4:a:p,b:p"
        )
    url = URL_SCHEME.match(text)
    if url:
        rest = text[url.end() :].split("/", 1)[0]
        hint = f"use {rest}" if rest else "use HOST:PORT"
        raise TargetError(
            f"--encoder {target!r} is a URL, but the encoder speaks gRPC: {hint} (no {url.group(1)}://; "
            f"TLS is --tls). The HTTP /predict endpoint is for Hugging Face-style clients only"
        )
    if any(c.isspace() for c in text) or "/" in text:
        raise TargetError(f"--encoder {target!r} is not HOST:PORT (default port {DEFAULT_PORT})")
    if text.startswith("["):  # [v6]:port or [v6]
        close = text.find("]")
        if close < 0:
            raise TargetError(f"--encoder {target!r}: an IPv6 address needs its closing ']', e.g. [::1]:{DEFAULT_PORT}")
        host, rest = text[: close + 1], text[close + 1 :]
        if rest and not rest.startswith(":"):
            raise TargetError(f"--encoder {target!r} is not [IPV6]:PORT")
        port_text = rest[1:] if rest else None
    elif text.count(":") > 1:  # a bare IPv6 address: the port cannot be told apart, so none is read
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            raise TargetError(f"--encoder {target!r} is not HOST:PORT; write an IPv6 address as [ADDR]:PORT") from None
        host, port_text = f"[{text}]", None
    else:
        host, _, port_text = text.partition(":")
        if not host:
            raise TargetError(f"--encoder {target!r} has no host; e.g. localhost{text}")
        port_text = port_text if ":" in text else None
    if port_text is None:
        return host, DEFAULT_PORT
    if not port_text.isdigit():
        raise TargetError(f"--encoder {target!r}: the port {port_text!r} is not a number (default {DEFAULT_PORT})")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise TargetError(
            f"--encoder {target!r}: port {port} is outside 1-65535 (the encoder's default is {DEFAULT_PORT})"
        )
    return host, port


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _address_list_target(addresses: list[tuple[str, int]], target: str) -> str:
    """One gRPC target naming every address: ``ipv4:a:p,b:p`` or ``ipv6:[a]:p,[b]:p``."""
    if any(_ip(host) is None for host, _ in addresses):
        addresses = _resolve_names(addresses, target)
    ips = [(ip, port) for host, port in addresses if (ip := _ip(host)) is not None]
    if all(ip.version == 4 for ip, _ in ips):
        return "ipv4:" + ",".join(f"{ip}:{port}" for ip, port in ips)
    if all(ip.version == 6 for ip, _ in ips):
        return "ipv6:" + ",".join(f"[{ip}]:{port}" for ip, port in ips)
    raise TargetError(
        f"--encoder {target!r} mixes IPv4 and IPv6 addresses; gRPC takes a list of one kind only "
        f"(ipv4:a:p,b:p or ipv6:[a]:p,[b]:p)"
    )


def _resolve_names(addresses: list[tuple[str, int]], target: str) -> list[tuple[str, int]]:
    """The addresses with every host name looked up once (IPv4 when every name has one, else IPv6).

    gRPC can balance over a list of IP addresses (``ipv4:``/``ipv6:``) or over every
    address of ONE DNS name (``dns:///name:port``, re-resolved when connections fail),
    but it has no target for several names. So ``a:1,b:2`` is resolved here, when the
    client is created, and not again: for names whose addresses change (Kubernetes
    pods, containers that are recreated), give one DNS name with ``dns:///``.
    """
    per_address: list[dict[int, list[str]]] = []
    for host, port in addresses:
        ip = _ip(host)
        if ip is not None:
            per_address.append({ip.version: [str(ip)]})
            continue
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise TargetError(f"--encoder {target!r}: cannot look up {host!r} ({exc.strerror or exc})") from None
        found: dict[int, list[str]] = {4: [], 6: []}
        for family, _, _, _, sockaddr in infos:
            version = {socket.AF_INET: 4, socket.AF_INET6: 6}.get(family)
            if version and str(sockaddr[0]) not in found[version]:
                found[version].append(str(sockaddr[0]))
        per_address.append(found)
    for version in (4, 6):  # one family for the whole list, IPv4 when every address has one
        if all(found.get(version) for found in per_address):
            resolved = [
                (ip, port) for found, (_, port) in zip(per_address, addresses, strict=True) for ip in found[version]
            ]
            return list(dict.fromkeys(resolved))
    raise TargetError(f"--encoder {target!r}: the names do not all resolve to addresses of one family (IPv4 or IPv6)")


def can_name_several(target: str) -> bool:
    """Whether a parsed target may name more than one server (then ``round_robin`` is the default)."""
    if target.startswith(("ipv4:", "ipv6:")):
        return "," in target
    return target.startswith("dns:")


def service_config(lb_policy: str) -> str:
    """The gRPC service config (JSON) every channel gets (docs/replicas.md, "Client targets and load balancing").

    - ``loadBalancingConfig``: ``round_robin`` spreads calls over every address of the
      target; ``pick_first`` sticks to one.
    - ``healthCheckConfig``: each subchannel watches ``grpc.health.v1`` for the
      TextEncoder service; a replica that says NOT_SERVING (draining, or stopping)
      gets no new calls.
    - ``retryPolicy`` for ``GetInfo`` and ``Encode``: a call that fails with
      ``UNAVAILABLE`` before the server sent its response headers (a replica that
      died, refused or was draining) is retried by gRPC, on another replica when
      round_robin has one ready (gRPC A6: once response headers arrived the call
      is committed and gRPC cannot retry it; :class:`dit_client.remote.RemoteTextEncoder`
      sends such a broken ``Encode`` again itself). ``EncodeStream`` is not listed:
      :mod:`dit_client.stream` reopens a broken stream and resends what was in flight.
    """
    retry = {
        "maxAttempts": GRPC_RETRY_ATTEMPTS,
        "initialBackoff": "0.1s",
        "maxBackoff": "1s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    return json.dumps(
        {
            "loadBalancingConfig": [{lb_policy: {}}],
            "healthCheckConfig": {"serviceName": SERVICE_NAME},
            "methodConfig": [
                {
                    "name": [
                        {"service": SERVICE_NAME, "method": "GetInfo"},
                        {"service": SERVICE_NAME, "method": "Encode"},
                    ],
                    "retryPolicy": retry,
                }
            ],
        }
    )


@dataclass(frozen=True)
class TLSConfig:
    """Client-side TLS settings (paths to PEM files).

    Attributes:
        ca_cert: CA bundle that signed the server certificate; None uses the system roots.
        client_cert, client_key: for mutual TLS, the client's certificate and key; both or neither.
        server_name: override the name checked against the server certificate.

    Raises:
        TLSUsageError: a certificate without its key or a key without its certificate.
    """

    ca_cert: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    server_name: str | None = None

    def __post_init__(self):
        # gRPC aborts the whole process (SIGABRT) on a chain without a key, and ignores a key without a chain.
        if bool(self.client_cert) != bool(self.client_key):
            given, missing = ("--tls-cert", "--tls-key") if self.client_cert else ("--tls-key", "--tls-cert")
            raise TLSUsageError(
                f"{given} was given without {missing}: mutual TLS needs the client certificate and its key "
                f"together (or neither)"
            )

    def credentials(self) -> grpc.ChannelCredentials:
        def read(p: str | None) -> bytes | None:
            if not p:
                return None
            try:
                return Path(p).read_bytes()
            except OSError as exc:
                raise TLSUsageError(f"cannot read TLS file {p}: {exc.strerror or exc}") from None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_cert),
            private_key=read(self.client_key),
            certificate_chain=read(self.client_cert),
        )


def _hint_for(details: str, tls: bool) -> str:
    """What a person should try for a transport failure, judged from gRPC's own wording."""
    text = details.lower()
    if "http/2" in text or "http1" in text or "http/1" in text:
        return (
            f"that port answers HTTP/1.1, not gRPC. Is it the --http-port? Use the gRPC port (default {DEFAULT_PORT})"
        )
    if "handshake" in text or "ssl" in text or "tls" in text:
        if "certificate_verify_failed" in text or ("certificate" in text and "verify" in text):
            return "the server's certificate is not trusted: pass --tls-ca with the CA that signed it"
        if tls and "wrong_version_number" in text:
            return "the TLS handshake failed: the server looks like plaintext; drop --tls (or start it with --tls-cert)"
        return "the TLS handshake failed: check --tls, --tls-ca and, for mutual TLS, --tls-cert/--tls-key"
    if not tls and ("socket closed" in text or "connection reset" in text):
        return "the server closed the connection: it may use TLS; if so connect with --tls (and --tls-ca)"
    if "connection refused" in text:
        return "nothing listens there: is the server running, and is this its gRPC port?"
    if "deadline" in text or "timeout" in text or "timed out" in text:
        return "no answer in time: check the host, the port and any firewall"
    return ""


class Connection:
    """One gRPC channel to an encoder, with its stubs, call metadata and error translation.

    Args:
        target: an ``--encoder`` value; see :func:`parse_target`. It may name several
            replicas (a comma list, ``dns:///name:port`` or ``ipv4:a:p,b:p``).
        api_key: sent as ``authorization: Bearer KEY`` on every call.
        tls: ``None``/``False`` for plaintext, ``True`` for TLS with the system roots, or a :class:`TLSConfig`.
        timeout: seconds per call (deadline).
        lb_policy: ``round_robin`` or ``pick_first``; ``None`` chooses ``round_robin`` when
            the target can name several addresses (:func:`can_name_several`), else ``pick_first``.
        channel_options: extra gRPC channel arguments, ``(name, value)`` pairs; they win
            over the ones set here (e.g. your own ``grpc.service_config``).

    Attributes:
        target: the address as dialled (after :func:`parse_target`).
        lb_policy: the load-balancing policy in the channel's service config.
        metadata: call metadata for every RPC.
        stub: the generated ``TextEncoderStub`` (for ``GetInfo``).
        encode_raw, encode_stream_raw: ``Encode`` / ``EncodeStream`` whose responses
            arrive as raw bytes, to be split by :func:`common.wire.decode_response_frame`:
            chunk bytes are then copied once, into the output tensor (protobuf would copy them twice more).
    """

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        tls: TLSConfig | bool | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        lb_policy: str | None = None,
        channel_options: Sequence[tuple[str, object]] = (),
    ):
        self.target = parse_target(target)
        if not timeout > 0:
            raise TargetError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if lb_policy is not None and lb_policy not in LB_POLICIES:
            raise TargetError(f"lb_policy must be one of {', '.join(LB_POLICIES)}, got {lb_policy!r}")
        self.timeout = timeout
        self.tls = bool(tls)
        self.lb_policy = lb_policy or ("round_robin" if can_name_several(self.target) else "pick_first")
        options: dict[str, object] = {
            "grpc.max_receive_message_length": MAX_RECEIVE_BYTES,
            "grpc.service_config": service_config(self.lb_policy),
            # Ours is the service config: never one from DNS TXT records.
            "grpc.service_config_disable_resolution": 1,
            "grpc.enable_retries": 1,
        }
        if tls:
            tls_cfg = tls if isinstance(tls, TLSConfig) else TLSConfig()
            if tls_cfg.server_name:
                options["grpc.ssl_target_name_override"] = tls_cfg.server_name
        options.update(dict(channel_options))
        if tls:
            self.channel = grpc.secure_channel(self.target, tls_cfg.credentials(), options=list(options.items()))
        else:
            self.channel = grpc.insecure_channel(self.target, options=list(options.items()))
        self.stub = pb2_grpc.TextEncoderStub(self.channel)
        self.encode_raw: grpc.UnaryStreamMultiCallable[pb2.EncodeRequest, bytes] = self.channel.unary_stream(
            f"/{SERVICE_NAME}/Encode",
            request_serializer=pb2.EncodeRequest.SerializeToString,
            response_deserializer=None,
        )
        self.encode_stream_raw: grpc.StreamStreamMultiCallable[pb2.EncodeRequest, bytes] = self.channel.stream_stream(
            f"/{SERVICE_NAME}/EncodeStream",
            request_serializer=pb2.EncodeRequest.SerializeToString,
            response_deserializer=None,
        )
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    def close(self) -> None:
        self.channel.close()

    def get_info(self, model: str = "") -> pb2.GetInfoResponse:
        """The raw ``GetInfo`` answer about ``model`` (empty: the server's first) in at most 30 s, or the translated error."""
        try:
            return self.stub.GetInfo(
                pb2.GetInfoRequest(model=model), timeout=min(self.timeout, 30.0), metadata=self.metadata
            )
        except grpc.RpcError as err:
            raise self.translate(err) from None

    def translate(self, err: grpc.RpcError) -> Flux2RemoteError:
        """The :class:`Flux2RemoteError` for a failed call, with a hint when the transport failed."""
        code, details = err.code(), err.details() or ""
        if code == grpc.StatusCode.UNAVAILABLE:
            hint = _hint_for(details, self.tls)
            # gRPC's text ends up in the message too, shortened to its last, most specific part.
            cause = details.rsplit(": ", 1)[-1] if hint else details
            return EncoderUnavailable(
                f"cannot reach the encoder at {self.target}: {hint or cause}" + (f" ({cause})" if hint else "")
            )
        if code == grpc.StatusCode.UNKNOWN and _hint_for(details, self.tls):
            return EncoderUnavailable(f"cannot reach the encoder at {self.target}: {_hint_for(details, self.tls)}")
        trailing = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
        return error_from_code(code, details or code.name, retry_after_s=retry_after_from_metadata(trailing))
