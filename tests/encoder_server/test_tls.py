"""TLS and mutual TLS on the gRPC port and the HTTP endpoint, with throwaway certificates."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.config import AuthConfig, HTTPConfig, ServerConfig, ServerTLSConfig
from common.errors import EncoderUnavailable
from dit_client.remote import RemoteTextEncoder, TLSConfig
from encoder_server.tls import TLSConfigError, load_server_tls
from tests.helpers import ServerThread

KEY = "tls-test-key-0123456789abcdef"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def _issue(path_stem: Path, cn: str, ca_cert, ca_key, *, server: bool, days: int = 2):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    cert_path, key_path = Path(f"{path_stem}.crt"), Path(f"{path_stem}.key")
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key_path, key)
    return str(cert_path), str(key_path)


def _ca(path: Path, cn: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


@dataclass
class PKI:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    rogue_cert: str  # a client certificate from another CA
    rogue_key: str
    folder: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> PKI:
    d = tmp_path_factory.mktemp("pki")
    ca_cert, ca_key = _ca(d / "ca.crt", "flux2 test CA")
    other_cert, other_key = _ca(d / "other-ca.crt", "someone else's CA")
    server_cert, server_key = _issue(d / "server", "localhost", ca_cert, ca_key, server=True, days=60)
    client_cert, client_key = _issue(d / "client", "alice-workstation", ca_cert, ca_key, server=False)
    rogue_cert, rogue_key = _issue(d / "rogue", "mallory", other_cert, other_key, server=False)
    return PKI(str(d / "ca.crt"), server_cert, server_key, client_cert, client_key, rogue_cert, rogue_key, d)


def tls_server(backend, pki: PKI, *, mutual: bool, **config_kwargs) -> ServerThread:
    tls = ServerTLSConfig(cert=pki.server_cert, key=pki.server_key, client_ca=pki.ca if mutual else None)
    return ServerThread(backend, ServerConfig(tls=tls, **config_kwargs), model_id="tiny-test")


# -- checks on the files --------------------------------------------------


def test_tls_off_when_no_file_is_given():
    assert load_server_tls(ServerTLSConfig()) is None


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"cert": "server.crt"}, "--tls-cert needs --tls-key"),
        ({"key": "server.key"}, "--tls-key needs --tls-cert"),
        ({"client_ca": "ca.crt"}, "--tls-client-ca needs --tls-cert"),
        ({"cert": "missing.crt", "key": "server.key"}, "missing.crt: no such file"),
        ({"cert": "server.key", "key": "server.key"}, "not a PEM certificate"),
        ({"cert": "server.crt", "key": "server.crt"}, "not a PEM private key"),
        ({"cert": "server.crt", "key": "client.key"}, "does not belong to the certificate"),
        ({"cert": "server.crt", "key": "server.key", "client_ca": "server.key"}, "--tls-client-ca .* not a PEM"),
    ],
)
def test_bad_tls_settings_are_clear_errors(pki, fields, message):
    config = ServerTLSConfig(**{k: str(pki.folder / v) for k, v in fields.items()})
    with pytest.raises(TLSConfigError, match=message):
        load_server_tls(config)


def test_encrypted_key_is_refused_with_a_fix(pki):
    key = serialization.load_pem_private_key(Path(pki.server_key).read_bytes(), password=None)
    encrypted = pki.folder / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(TLSConfigError, match="encrypted"):
        load_server_tls(ServerTLSConfig(cert=pki.server_cert, key=str(encrypted)))


def test_expired_certificate_is_refused(pki):
    later = datetime.now(UTC) + timedelta(days=90)
    with pytest.raises(TLSConfigError, match="expired on"):
        load_server_tls(ServerTLSConfig(cert=pki.server_cert, key=pki.server_key), now=later)


# -- gRPC -----------------------------------------------------------------


def test_tls_server_serves_tls_clients_and_refuses_plaintext(tiny_backend, pki, server):
    with RemoteTextEncoder(server.target) as plain:
        expected = plain.encode(["a red fox", "snow"])
    with tls_server(tiny_backend, pki, mutual=False) as s:
        with RemoteTextEncoder(s.target, tls=TLSConfig(ca_cert=pki.ca), timeout=20) as enc:
            got = enc.encode(["a red fox", "snow"])
        assert torch.equal(got, expected)
        with RemoteTextEncoder(s.target, timeout=5) as enc, pytest.raises(EncoderUnavailable):
            enc.info()
        # A client that does not trust our CA refuses the server.
        with (
            RemoteTextEncoder(s.target, tls=TLSConfig(ca_cert=str(pki.folder / "other-ca.crt")), timeout=5) as enc,
            pytest.raises(EncoderUnavailable),
        ):
            enc.info()


def test_mutual_tls_requires_a_client_certificate_from_the_ca(tiny_backend, pki):
    with tls_server(tiny_backend, pki, mutual=True) as s:
        good = TLSConfig(ca_cert=pki.ca, client_cert=pki.client_cert, client_key=pki.client_key)
        with RemoteTextEncoder(s.target, tls=good, timeout=20) as enc:
            assert enc.encode("a fox").shape[:2] == (1, 512)
        for bad in (
            TLSConfig(ca_cert=pki.ca),
            TLSConfig(ca_cert=pki.ca, client_cert=pki.rogue_cert, client_key=pki.rogue_key),
        ):
            with RemoteTextEncoder(s.target, tls=bad, timeout=5) as enc, pytest.raises(EncoderUnavailable):
                enc.info()
        # The server still serves after the refused handshakes.
        with RemoteTextEncoder(s.target, tls=good, timeout=20) as enc:
            assert enc.info().max_sequence_length == 512


def test_cli_client_flags_speak_mutual_tls_with_a_key(tiny_backend, pki, tmp_path):
    from dit_client.cli import main
    from dit_client.embeddings_io import load_embeddings

    keys = tmp_path / "keys.txt"
    keys.write_text(f"alice:{KEY}\n")
    keys.chmod(0o600)
    with tls_server(tiny_backend, pki, mutual=True, auth=AuthConfig(api_key_file=str(keys))) as s:
        out = tmp_path / "e.safetensors"
        code = main(
            [
                "encode",
                "--encoder",
                s.target,
                "--api-key",
                KEY,
                "--tls-ca",
                pki.ca,
                "--tls-cert",
                pki.client_cert,
                "--tls-key",
                pki.client_key,
                "--prompt",
                "a fox",
                "--out",
                str(out),
            ]
        )
        assert code == 0
        embeds, prompts, _ = load_embeddings(out)
        assert embeds.shape[:2] == (1, 512) and prompts == ["a fox"]


# -- HTTP endpoint --------------------------------------------------------


def test_http_endpoint_uses_the_same_tls_policy(tiny_backend, pki):
    with tls_server(tiny_backend, pki, mutual=True, http=HTTPConfig(port=0)) as s:
        url = f"https://127.0.0.1:{s.running.http.port}/predict"
        reply = requests.post(
            url, json={"prompt": "a fox"}, verify=pki.ca, cert=(pki.client_cert, pki.client_key), timeout=30
        )
        assert reply.status_code == 200
        assert reply.headers["Content-Type"] == "application/octet-stream"
        # With TLS 1.3 the server checks the client certificate after the
        # client thinks the handshake is done, so the refusal shows up as a
        # closed connection (SSLError is a ConnectionError too).
        for cert in (None, (pki.rogue_cert, pki.rogue_key)):
            with pytest.raises(requests.exceptions.ConnectionError):
                requests.post(url, json={"prompt": "a fox"}, verify=pki.ca, cert=cert, timeout=10)
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.post(url.replace("https", "http"), json={"prompt": "a fox"}, timeout=10)
        # Still serving.
        reply = requests.post(
            url, json={"prompt": "a fox"}, verify=pki.ca, cert=(pki.client_cert, pki.client_key), timeout=30
        )
        assert reply.status_code == 200


def test_cli_flags_fill_the_tls_config():
    from encoder_server.cli import build_parser, config_from_args

    args = build_parser().parse_args(
        ["serve", "--tls-cert", "s.crt", "--tls-key", "s.key", "--tls-client-ca", "ca.crt"]
    )
    assert config_from_args(args).tls == ServerTLSConfig(cert="s.crt", key="s.key", client_ca="ca.crt")
    assert not config_from_args(build_parser().parse_args(["serve"])).tls.enabled


def test_cli_refuses_incomplete_tls_flags_before_loading_the_model(tmp_path, capsys):
    from encoder_server.cli import EXIT_CONFIG, main

    code = main(["serve", "--model", str(tmp_path / "no-model"), "--tls-cert", str(tmp_path / "s.crt"), "--port", "0"])
    assert code == EXIT_CONFIG
    assert "--tls-cert needs --tls-key" in capsys.readouterr().err
