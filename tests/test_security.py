"""TLS, mutual TLS and bearer tokens on the serving port; the health and metrics ports
stay plaintext and open for probes and scrapes."""

from __future__ import annotations

import datetime
import ipaddress
import urllib.request
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving_helpers import RunningServer

from serving.client import RecurClient, connect

TOKEN = "s3cret-token-0123456789"


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _certificate(subject: str, key, issuer_key, issuer: str, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(folder: Path, name: str, key, certificate) -> tuple[str, str]:
    key_path, cert_path = folder / f"{name}.key", folder / f"{name}.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return str(cert_path), str(key_path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1, a client certificate, and a stranger's
    client certificate from another CA."""
    folder = tmp_path_factory.mktemp("pki")
    files = {}
    for ca_name in ("ca", "other-ca"):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        files[ca_name], _ = _write(folder, ca_name, ca_key,
                                   _certificate(ca_name, ca_key, ca_key, ca_name, ca=True))
        for leaf in (("server", "client") if ca_name == "ca" else ("stranger",)):
            key = ec.generate_private_key(ec.SECP256R1())
            files[leaf], files[f"{leaf}-key"] = _write(
                folder, leaf, key, _certificate(leaf, key, ca_key, ca_name, ca=False))
    tokens = folder / "tokens"
    tokens.write_text(f"# one per line\n{TOKEN}\nanother-token-abcdefghij\n")
    files["tokens"] = str(tokens)
    return files


@pytest.fixture(scope="module")
def server(model_repository, pki):
    running = RunningServer(model_repository, tls_cert=pki["server"], tls_key=pki["server-key"],
                            tls_client_ca=pki["ca"], auth_tokens=pki["tokens"], health_port=0,
                            channel_factory=lambda target: connect(
                                target, pki["ca"], pki["client"], pki["client-key"], TOKEN))
    yield running
    running.stop()


def score(channel: grpc.Channel) -> float:
    return RecurClient("", channel=channel).score("demo-lm", ["the dog"])[0].perplexity


def test_a_client_with_the_ca_its_certificate_and_a_token_is_served(server, pki):
    assert score(server.channel) > 1


def test_plaintext_and_unknown_certificates_are_refused(server, pki):
    for channel in (grpc.insecure_channel(server.target),  # no TLS at all
                    connect(server.target, pki["ca"], token=TOKEN),  # TLS, no client cert
                    connect(server.target, pki["ca"], pki["stranger"], pki["stranger-key"],
                            TOKEN)):  # a certificate from another CA
        with pytest.raises(grpc.RpcError) as refused:
            score(channel)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        channel.close()


def test_missing_and_wrong_tokens_are_unauthenticated_alike(server, pki):
    details = set()
    for token in (None, "wrong-token-0123456789", TOKEN + "x", ""):
        channel = connect(server.target, pki["ca"], pki["client"], pki["client-key"], token)
        with pytest.raises(grpc.RpcError) as refused:
            score(channel)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        details.add(refused.value.details())
        channel.close()
    assert len(details) == 1  # nothing about which check failed
    assert server.metric("recur_requests_total", method="Score", code="UNAUTHENTICATED") >= 4
    # every kind of RPC is guarded: a server stream and a bidirectional one too
    channel = connect(server.target, pki["ca"], pki["client"], pki["client-key"])
    client = RecurClient("", channel=channel)
    with pytest.raises(grpc.RpcError) as refused:
        list(client.complete("demo-lm", "the", max_tokens=2))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as refused:
        list(client.score_stream("demo-lm", [("0", ["the dog"])]))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    channel.close()


def test_probes_and_scrapes_need_neither_tls_nor_tokens(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.ports.health}") as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    page = urllib.request.urlopen(f"http://127.0.0.1:{server.ports.metrics}/metrics").read()
    assert b"recur_requests_total" in page


def test_bad_security_settings_are_refused(tmp_path):
    from serving.config import ServerConfig

    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        ServerConfig(tls_cert="a.pem")
    with pytest.raises(ValueError, match="tls_client_ca .* needs tls_cert"):
        ServerConfig(tls_client_ca="ca.pem")
    from serving.api.rpc.auth import read_tokens

    short = tmp_path / "tokens"
    short.write_text("# comment\nshort\n")
    with pytest.raises(ValueError, match="token 1 is shorter than 16"):
        read_tokens(str(short))
    short.write_text("# only a comment\n")
    with pytest.raises(ValueError, match="no bearer tokens"):
        read_tokens(str(short))
