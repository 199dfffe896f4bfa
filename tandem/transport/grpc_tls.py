"""TLS for the internal gRPC services (edge node, cloud_ctx, attention pool) and their clients.

TLS is off unless configured; then nothing changes. A process holds one `TlsConfig`:

- `cert` / `key`: its PEM certificate chain and private key. A server presents them; a client
  presents them too (mutual TLS) when they are set.
- `ca`: the PEM trust root. A client verifies the server's certificate against it (without it,
  gRPC's bundled public roots); a server with `require_client_cert` verifies clients against it.
- `server_name`: the name a client checks in the server's certificate instead of the target's
  host (for addresses that are not in the certificate's SANs).

Files are read once, by `TlsConfig.from_files` / `tls_from_env`; a missing or unreadable file
or a file that is not PEM fails there, at startup, with its path in the message. The bearer
token (`grpc_auth`) still applies on top of TLS: TLS protects the bytes on the wire and
proves the server's identity, the token (or a client certificate) proves the caller's.

Environment (read by `tls_from_env`, one place for every service):

    TANDEM_TLS_CERT         this process's certificate chain (PEM); servers need it
    TANDEM_TLS_KEY          its private key (PEM)
    TANDEM_TLS_CA           trust root (PEM) for the peers' certificates
    TANDEM_TLS_CLIENT_AUTH  "require": servers demand a client certificate signed by the CA
    TANDEM_TLS_SERVER_NAME  name clients expect in server certificates (override)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import grpc

ENV_CERT = "TANDEM_TLS_CERT"
ENV_KEY = "TANDEM_TLS_KEY"
ENV_CA = "TANDEM_TLS_CA"
ENV_CLIENT_AUTH = "TANDEM_TLS_CLIENT_AUTH"
ENV_SERVER_NAME = "TANDEM_TLS_SERVER_NAME"

Options = Sequence[tuple[str, int | str]]


class TlsConfigError(ValueError):
    """A TLS setting that cannot work (missing file, not PEM, cert without key...)."""


@dataclass(frozen=True, repr=False)
class TlsConfig:
    cert: bytes | None = None  # PEM certificate chain of this process
    key: bytes | None = None  # PEM private key (never shown by repr)
    ca: bytes | None = None  # PEM trust root for the peers
    require_client_cert: bool = False  # servers: mutual TLS
    server_name: str | None = None  # clients: expected name in the server's certificate

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise TlsConfigError("a TLS certificate and its private key go together: set both")
        if self.require_client_cert and self.ca is None:
            raise TlsConfigError("requiring client certificates needs a CA to verify them")

    def __repr__(self) -> str:
        return (
            f"TlsConfig(cert={self.cert is not None}, key={'<set>' if self.key else None}, "
            f"ca={self.ca is not None}, require_client_cert={self.require_client_cert}, "
            f"server_name={self.server_name!r})"
        )

    @property
    def can_serve(self) -> bool:
        return self.cert is not None

    @classmethod
    def from_files(
        cls,
        cert: str | os.PathLike | None = None,
        key: str | os.PathLike | None = None,
        ca: str | os.PathLike | None = None,
        *,
        require_client_cert: bool = False,
        server_name: str | None = None,
    ) -> TlsConfig:
        """Read the PEM files now (TlsConfigError names the file that fails)."""
        return cls(
            cert=_read_pem(cert, "certificate", "CERTIFICATE"),
            key=_read_pem(key, "private key", "PRIVATE KEY"),
            ca=_read_pem(ca, "CA", "CERTIFICATE"),
            require_client_cert=require_client_cert,
            server_name=server_name or None,
        )


def _read_pem(path: str | os.PathLike | None, what: str, marker: str) -> bytes | None:
    if path is None or str(path) == "":
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"cannot read TLS {what} {str(path)!r}: {exc.strerror}") from exc
    if b"-----BEGIN" not in data or marker.encode() not in data:
        raise TlsConfigError(f"TLS {what} {str(path)!r} is not a PEM file with a {marker}")
    return data


_TRUE = {"1", "true", "yes", "on", "require", "required"}
_FALSE = {"", "0", "false", "no", "off", "none"}


def tls_from_env(env: Mapping[str, str] = os.environ) -> TlsConfig | None:
    """The process's TLS settings from TANDEM_TLS_* (None, plaintext, when none is set)."""
    cert, key, ca = env.get(ENV_CERT), env.get(ENV_KEY), env.get(ENV_CA)
    auth = (env.get(ENV_CLIENT_AUTH) or "").strip().lower()
    name = env.get(ENV_SERVER_NAME) or None
    if not (cert or key or ca or auth in _TRUE or name):
        return None
    if auth not in _TRUE | _FALSE:
        raise TlsConfigError(f"{ENV_CLIENT_AUTH} must be 'require' or unset, got {auth!r}")
    if bool(cert) != bool(key):
        raise TlsConfigError(f"set both {ENV_CERT} and {ENV_KEY}, or neither")
    if auth in _TRUE and not ca:
        raise TlsConfigError(f"{ENV_CLIENT_AUTH}=require needs {ENV_CA}")
    return TlsConfig.from_files(cert, key, ca, require_client_cert=auth in _TRUE, server_name=name)


# -- servers ---------------------------------------------------------------------------------


def tls_from_env_or(
    fail: Callable[[str], NoReturn], env: Mapping[str, str] = os.environ
) -> TlsConfig | None:
    """`tls_from_env`, with a bad setting handed to `fail` (a parser's `error`, or an exit
    naming the service) so a service stops at start-up saying why."""
    try:
        return tls_from_env(env)
    except TlsConfigError as exc:
        fail(str(exc))


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    if not tls.can_serve:
        raise TlsConfigError(f"a TLS server needs a certificate and key ({ENV_CERT}, {ENV_KEY})")
    assert tls.cert is not None and tls.key is not None
    return grpc.ssl_server_credentials(
        [(tls.key, tls.cert)],
        root_certificates=tls.ca if tls.require_client_cert else None,
        require_client_auth=tls.require_client_cert,
    )


def add_port(server: grpc.aio.Server | grpc.Server, address: str, tls: TlsConfig | None) -> int:
    """Bind `address` with TLS when `tls` is given, else plaintext; the bound port (0: failed)."""
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, server_credentials(tls))


# -- clients ---------------------------------------------------------------------------------


def channel_credentials(tls: TlsConfig) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert
    )


def _channel_options(tls: TlsConfig, options: Options | None) -> list[tuple[str, int | str]]:
    opts = list(options or ())
    if tls.server_name:
        opts.append(("grpc.ssl_target_name_override", tls.server_name))
    return opts


def aio_channel(
    target: str, tls: TlsConfig | None, options: Options | None = None
) -> grpc.aio.Channel:
    """A grpc.aio channel: secure with `tls`, else plaintext."""
    if tls is None:
        return grpc.aio.insecure_channel(target, options=list(options or ()))
    return grpc.aio.secure_channel(
        target, channel_credentials(tls), options=_channel_options(tls, options)
    )


def sync_channel(
    target: str, tls: TlsConfig | None, options: Options | None = None
) -> grpc.Channel:
    """A blocking grpc channel: secure with `tls`, else plaintext."""
    if tls is None:
        return grpc.insecure_channel(target, options=list(options or ()))
    return grpc.secure_channel(
        target, channel_credentials(tls), options=_channel_options(tls, options)
    )
