"""TLS on the internal gRPC services, over real gRPC on 127.0.0.1, with a throwaway PKI made
at test time (the `cryptography` package when installed, else the `openssl` CLI): an edge
node, an attention worker and cloud_ctx serving TLS with the shared token on top; plaintext
clients, clients that trust another CA and clients without the token are refused; mutual TLS;
the router's edge clients; and the TANDEM_TLS_* settings."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import shutil
import subprocess
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry

from services.attention_pool.kv_store import KVStore
from services.attention_pool.metrics import AttnMetrics
from services.attention_pool.worker import (
    AttentionWorkerServicer,
    ModelShape,
    start_attention_worker,
)
from services.cloud_ctx.grpc_server import start_cloud_server
from services.edge_node.grpc_server import RunningGrpcServer, start_grpc_server
from services.router.replicas import EdgeProber, Replica
from tandem.clients.edge import EdgeClient, EdgeRpcError, EdgeUnauthenticated
from tandem.clients.pool import AttendItem, PoolClient, PoolShape, PoolUnavailable
from tandem.runtime.sampling import SamplingParams
from tandem.transport.grpc_auth import bearer_metadata
from tandem.transport.grpc_tls import (
    TlsConfig,
    TlsConfigError,
    aio_channel,
    server_credentials,
    tls_from_env,
)
from tandem_proto.cloud.v1 import cloud_pb2, cloud_pb2_grpc
from tests.services.edge_node.grpc_fakes import FakeEngine

TIMEOUT = 20.0  # seconds per test, end to end
TOKEN = "s3cret-token"
REFUSED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, TIMEOUT))


# -- a throwaway PKI ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path  # SAN localhost, 127.0.0.1; serverAuth + clientAuth
    server_key: Path
    client_cert: Path  # CN tandem-client; clientAuth
    client_key: Path
    other_ca: Path  # an unrelated CA
    other_client_cert: Path  # signed by other_ca
    other_client_key: Path


def _make_pki_cryptography(d: Path) -> Pki:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        path.with_suffix(".key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    def issue(cn, key, issuer, issuer_key, *, ca=False, sans=(), usages=()):
        b = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        if usages:
            b = b.add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    def new_ca(stem: str) -> tuple[x509.Name, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        write(d / stem, issue(f"{stem} CA", key, name(f"{stem} CA"), key, ca=True), key)
        return name(f"{stem} CA"), key

    ca_name, ca_key = new_ca("ca")
    other_name, other_key = new_ca("other-ca")
    sans = (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    both = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)
    client = (ExtendedKeyUsageOID.CLIENT_AUTH,)
    for stem, issuer, ikey, kw in [
        ("server", ca_name, ca_key, {"sans": sans, "usages": both}),
        ("client", ca_name, ca_key, {"usages": client}),
        ("other-client", other_name, other_key, {"usages": client}),
    ]:
        key = ec.generate_private_key(ec.SECP256R1())
        write(d / stem, issue(f"tandem-{stem}", key, issuer, ikey, **kw), key)
    return _pki(d)


def _make_pki_openssl(d: Path) -> Pki:
    def sh(*args: str) -> None:
        subprocess.run(
            ["openssl", *args],
            cwd=d,
            check=True,
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=60,
        )

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    for stem in ("ca", "other-ca"):
        sh("req", "-x509", *ec, "-keyout", f"{stem}.key", "-out", f"{stem}.crt", "-days", "1",
           "-subj", f"/CN={stem} CA", "-addext", "basicConstraints=critical,CA:TRUE",
           "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    (d / "server.ext").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n"
    )
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for stem, ca, ext in [
        ("server", "ca", "server.ext"),
        ("client", "ca", "client.ext"),
        ("other-client", "other-ca", "client.ext"),
    ]:
        sh("req", "-new", *ec, "-keyout", f"{stem}.key", "-out", f"{stem}.csr",
           "-subj", f"/CN=tandem-{stem}")  # fmt: skip
        sh("x509", "-req", "-in", f"{stem}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
           "-CAcreateserial", "-out", f"{stem}.crt", "-days", "1", "-extfile", ext)  # fmt: skip
    return _pki(d)


def _pki(d: Path) -> Pki:
    return Pki(
        d / "ca.crt",
        d / "server.crt",
        d / "server.key",
        d / "client.crt",
        d / "client.key",
        d / "other-ca.crt",
        d / "other-client.crt",
        d / "other-client.key",
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    try:
        import cryptography  # noqa: F401
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("neither the cryptography package nor the openssl CLI is available")
        return _make_pki_openssl(d)
    return _make_pki_cryptography(d)


def server_tls(pki: Pki, *, mutual: bool = False) -> TlsConfig:
    return TlsConfig.from_files(
        pki.server_cert, pki.server_key, pki.ca if mutual else None, require_client_cert=mutual
    )


def client_tls(pki: Pki, **kw: Any) -> TlsConfig:
    return TlsConfig.from_files(ca=pki.ca, **kw)


# -- the edge node ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def edge(tls: TlsConfig, token: str | None = TOKEN) -> AsyncIterator[RunningGrpcServer]:
    srv = await start_grpc_server(FakeEngine(), "127.0.0.1", 0, token=token, tls=tls)
    try:
        yield srv
    finally:
        await srv.stop(grace=None)


async def generate_text(client: EdgeClient) -> str:
    params = SamplingParams(max_tokens=2)
    chunks = [c async for c in client.generate(prompt="hi", params=params, timeout=5)]
    return "".join(c.text for c in chunks)


def test_edge_over_tls_with_token(pki: Pki) -> None:
    async def body() -> None:
        async with edge(server_tls(pki)) as srv:
            target = f"127.0.0.1:{srv.port}"
            async with EdgeClient(target, token=TOKEN, tls=client_tls(pki)) as client:
                assert await generate_text(client)
                assert (await client.info()).model_id == "fake-model"
                assert (await client.health()).serving
            # the name checked in the certificate follows the override, not the target
            localhost = client_tls(pki, server_name="localhost")
            async with EdgeClient(target, token=TOKEN, tls=localhost) as client:
                assert await generate_text(client)
            elsewhere = client_tls(pki, server_name="edge.example.org")
            async with EdgeClient(target, token=TOKEN, tls=elsewhere) as client:
                with pytest.raises(EdgeRpcError) as info:
                    await client.health(timeout=2)
                assert info.value.code in REFUSED

    run(body())


def test_edge_tls_refuses_plaintext_and_foreign_ca(pki: Pki) -> None:
    async def body() -> None:
        async with edge(server_tls(pki)) as srv:
            target = f"127.0.0.1:{srv.port}"
            foreign = TlsConfig.from_files(ca=pki.other_ca)
            for tls in (None, foreign):
                async with EdgeClient(target, token=TOKEN, tls=tls) as client:
                    with pytest.raises(EdgeRpcError) as info:
                        await client.health(timeout=2)
                    assert info.value.code in REFUSED
                    with pytest.raises(EdgeRpcError) as info:
                        await generate_text(client)
                    assert info.value.code in REFUSED

    run(body())


def test_edge_tls_still_requires_the_token(pki: Pki) -> None:
    async def body() -> None:
        async with edge(server_tls(pki)) as srv:
            target = f"127.0.0.1:{srv.port}"
            for token in (None, "wrong"):
                async with EdgeClient(target, token=token, tls=client_tls(pki)) as client:
                    assert (await client.health()).serving  # probes carry no token
                    with pytest.raises(EdgeUnauthenticated):
                        await generate_text(client)
                    with pytest.raises(EdgeUnauthenticated):
                        await client.info()

    run(body())


def test_edge_mutual_tls(pki: Pki) -> None:
    async def body() -> None:
        async with edge(server_tls(pki, mutual=True)) as srv:
            target = f"127.0.0.1:{srv.port}"
            with_cert = client_tls(pki, cert=pki.client_cert, key=pki.client_key)
            async with EdgeClient(target, token=TOKEN, tls=with_cert) as client:
                assert await generate_text(client)
            # the server's certificate carries clientAuth too: one cert per service works
            as_server = client_tls(pki, cert=pki.server_cert, key=pki.server_key)
            async with EdgeClient(target, token=TOKEN, tls=as_server) as client:
                assert await generate_text(client)
            foreign = client_tls(pki, cert=pki.other_client_cert, key=pki.other_client_key)
            for tls in (client_tls(pki), foreign):  # no client certificate / a foreign one
                async with EdgeClient(target, token=TOKEN, tls=tls) as client:
                    with pytest.raises(EdgeRpcError) as info:
                        await generate_text(client)
                    assert info.value.code in REFUSED

    run(body())


def test_router_edge_clients_over_tls(pki: Pki) -> None:
    async def body() -> None:
        async with edge(server_tls(pki)) as srv:
            replica = Replica("e", "edge", f"127.0.0.1:{srv.port}", TOKEN)
            prober = EdgeProber(timeout_s=5, tls=client_tls(pki))
            try:
                assert (await prober.probe(replica)).serving
            finally:
                await prober.close()
            plain = EdgeProber(timeout_s=1)
            try:
                with pytest.raises(EdgeRpcError):
                    await plain.probe(replica)
            finally:
                await plain.close()

    run(body())


# -- the attention pool -------------------------------------------------------------------------

H, KVH, HD = 4, 2, 8


def attention_servicer() -> AttentionWorkerServicer:
    store = KVStore(0, 1, 0, KVH, HD, torch.bfloat16, 1 << 20)
    metrics = AttnMetrics(CollectorRegistry())
    metrics.bind_store(store)
    return AttentionWorkerServicer(
        store, ModelShape(H, KVH, HD, HD**-0.5), load_wait_s=2.0, metrics=metrics
    )


def test_attention_worker_and_pool_client_over_tls(pki: Pki) -> None:
    async def body() -> None:
        worker = await start_attention_worker(
            attention_servicer(), "127.0.0.1", 0, TOKEN, tls=server_tls(pki)
        )
        address = [f"127.0.0.1:{worker.port}"]
        shape = PoolShape(H, KVH, HD)

        def use_pool() -> None:
            pool = PoolClient(address, shape, token=TOKEN, tls=client_tls(pki), connect_timeout_s=5)
            try:
                g = torch.Generator().manual_seed(0)
                q, k, v = (torch.randn(3, n, HD, generator=g).bfloat16() for n in (H, KVH, KVH))
                (out,) = pool.attend(0, [AttendItem("s", 0, q, k, v)])
                assert out.shape == (3, H, HD)
            finally:
                pool.close()
            with pytest.raises(PoolUnavailable):
                PoolClient(address, shape, token=TOKEN, connect_timeout_s=1)  # plaintext

        try:
            await asyncio.to_thread(use_pool)
        finally:
            await worker.stop(grace=None)

    run(body())


# -- cloud_ctx ----------------------------------------------------------------------------------


class ReleasingManager:
    """Just enough of CloudContextManager for the Release RPC."""

    def release(self, session_id: str) -> bool:
        return session_id == "known"


def test_cloud_ctx_over_tls_with_token(pki: Pki) -> None:
    async def body() -> None:
        srv = await start_cloud_server(
            ReleasingManager(), "127.0.0.1", 0, token=TOKEN, tls=server_tls(pki)
        )
        target = f"127.0.0.1:{srv.port}"
        request = cloud_pb2.ReleaseRequest(session_id="known")
        try:
            async with aio_channel(target, client_tls(pki)) as channel:
                stub = cloud_pb2_grpc.CloudContextStub(channel)
                reply = await stub.Release(request, timeout=5, metadata=bearer_metadata(TOKEN))
                assert reply.released
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Release(request, timeout=5)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            async with aio_channel(target, None) as channel:
                stub = cloud_pb2_grpc.CloudContextStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Release(request, timeout=2, metadata=bearer_metadata(TOKEN))
                assert info.value.code() in REFUSED
        finally:
            await srv.stop(grace=0)

    run(body())


# -- settings -----------------------------------------------------------------------------------


def test_tls_from_env(pki: Pki, tmp_path: Path) -> None:
    assert tls_from_env({}) is None
    assert tls_from_env({"TANDEM_TLS_CLIENT_AUTH": "", "OTHER": "x"}) is None

    client = tls_from_env({"TANDEM_TLS_CA": str(pki.ca)})
    assert client is not None and client.ca == pki.ca.read_bytes()
    assert not client.can_serve and client.cert is None
    with pytest.raises(TlsConfigError, match="TANDEM_TLS_CERT"):
        server_credentials(client)  # a CA alone cannot serve

    env = {
        "TANDEM_TLS_CERT": str(pki.server_cert),
        "TANDEM_TLS_KEY": str(pki.server_key),
        "TANDEM_TLS_CA": str(pki.ca),
        "TANDEM_TLS_CLIENT_AUTH": "require",
        "TANDEM_TLS_SERVER_NAME": "localhost",
    }
    full = tls_from_env(env)
    assert full is not None and full.can_serve and full.require_client_cert
    assert full.server_name == "localhost"
    assert "PRIVATE" not in repr(full) and "BEGIN" not in repr(full)
    server_credentials(full)

    def fails(match: str, **changes: str) -> None:
        with pytest.raises(TlsConfigError, match=match):
            tls_from_env({**env, **changes})

    fails("both", TANDEM_TLS_KEY="")
    fails("both", TANDEM_TLS_CERT="")
    fails("needs TANDEM_TLS_CA", TANDEM_TLS_CA="")
    fails("must be 'require'", TANDEM_TLS_CLIENT_AUTH="maybe")
    fails(
        "cannot read TLS certificate .*missing.crt", TANDEM_TLS_CERT=str(tmp_path / "missing.crt")
    )
    (tmp_path / "junk.pem").write_text("not a certificate")
    fails("not a PEM file", TANDEM_TLS_CA=str(tmp_path / "junk.pem"))
    fails("not a PEM file", TANDEM_TLS_KEY=str(pki.server_cert))  # a cert where a key goes
    assert tls_from_env({**env, "TANDEM_TLS_CLIENT_AUTH": "0"}).require_client_cert is False


def test_openssl_pki_works_too(tmp_path: Path) -> None:
    """The openssl fallback makes the same PKI (run where openssl exists)."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl CLI")
    pki = _make_pki_openssl(tmp_path)

    async def body() -> None:
        async with edge(server_tls(pki, mutual=True)) as srv:
            tls = client_tls(pki, cert=pki.client_cert, key=pki.client_key)
            async with EdgeClient(f"127.0.0.1:{srv.port}", token=TOKEN, tls=tls) as client:
                assert await generate_text(client)

    run(body())
