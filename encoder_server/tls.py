"""TLS and mutual TLS for the gRPC port and the HTTP endpoint.

Files are read and checked once, at start-up, before the model loads, so a
wrong path or a key that does not match its certificate fails in a second
with a message naming the flag, not after minutes of loading weights.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from common.config import ServerTLSConfig
from encoder_server.text_encoder import ConfigError

log = logging.getLogger(__name__)

_EXPIRY_WARNING = timedelta(days=14)


class TLSConfigError(ConfigError):
    """The TLS flags are incomplete or name unusable files (the CLI exits with code 2)."""


@dataclass(frozen=True)
class ServerTLS:
    """Checked TLS material for the server.

    Attributes:
        cert_path, key_path: PEM certificate chain and its private key.
        cert_chain, private_key: their bytes.
        client_ca: PEM CA certificates that sign client certificates; ``None``
            means clients are not asked for a certificate.
    """

    cert_path: Path
    key_path: Path
    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """Credentials for ``server.add_secure_port``; with a client CA, clients without a valid certificate are refused."""
        return grpc.ssl_server_credentials(
            [(self.private_key, self.cert_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.mutual,
        )

    def ssl_context(self) -> ssl.SSLContext:
        """The same policy for the HTTP endpoint."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_path, self.key_path)
        if self.client_ca is not None:
            context.load_verify_locations(cadata=self.client_ca.decode("ascii"))
            context.verify_mode = ssl.CERT_REQUIRED
        return context


def _read(flag: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise TLSConfigError(f"{flag} {path}: no such file") from None
    except OSError as exc:
        raise TLSConfigError(f"{flag} {path}: cannot read it ({exc.strerror})") from None


def _certificates(flag: str, path: str, data: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TLSConfigError(f"{flag} {path}: not a PEM certificate (expected '-----BEGIN CERTIFICATE-----')") from None


def _public_der(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_server_tls(config: ServerTLSConfig, *, now: datetime | None = None) -> ServerTLS | None:
    """Check the TLS files named in ``config``; ``None`` when TLS is off.

    Raises:
        TLSConfigError: a flag is missing its partner, a file is missing or not
            PEM, the key is encrypted or does not match the certificate, or the
            certificate has expired.
    """
    if not config.enabled:
        return None
    if not config.cert or not config.key:
        missing = "--tls-key" if config.cert else "--tls-cert"
        given = "--tls-cert" if config.cert else ("--tls-key" if config.key else "--tls-client-ca")
        raise TLSConfigError(f"{given} needs {missing} too: TLS takes a certificate and its private key")

    cert_chain = _read("--tls-cert", config.cert)
    private_key = _read("--tls-key", config.key)
    certs = _certificates("--tls-cert", config.cert, cert_chain)
    try:
        key = serialization.load_pem_private_key(private_key, password=None)
    except TypeError:
        raise TLSConfigError(
            f"--tls-key {config.key}: the key is encrypted; the server needs it unencrypted "
            "(openssl pkey -in KEY -out KEY.plain), protected by file permissions"
        ) from None
    except ValueError:
        raise TLSConfigError(f"--tls-key {config.key}: not a PEM private key") from None
    if _public_der(key.public_key()) != _public_der(certs[0].public_key()):
        raise TLSConfigError(f"--tls-key {config.key} does not belong to the certificate in --tls-cert {config.cert}")

    now = now or datetime.now(UTC)
    expires = certs[0].not_valid_after_utc
    if expires <= now:
        raise TLSConfigError(f"--tls-cert {config.cert} expired on {expires:%Y-%m-%d %H:%M} UTC")
    if expires - now < _EXPIRY_WARNING:
        log.warning("TLS certificate %s expires on %s UTC; renew it soon", config.cert, f"{expires:%Y-%m-%d}")

    client_ca = None
    if config.client_ca:
        client_ca = _read("--tls-client-ca", config.client_ca)
        _certificates("--tls-client-ca", config.client_ca, client_ca)
    return ServerTLS(Path(config.cert), Path(config.key), cert_chain, private_key, client_ca)
