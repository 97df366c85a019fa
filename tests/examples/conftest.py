"""Real tickd servers for the example tests: the binary that `cargo test` built (or
$TICKD_BIN), on free ports, with temporary data directories. One is open and plaintext; the
secured ones use certificates and an auth file that the fixtures make (no key is committed)."""

import datetime
import hashlib
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tickd_process import start_tickd, stop  # noqa: F401 (the tests import them from here)

# The token the examples send, and the auth file that knows it: the principal may manage and
# consume the example queues and nothing else. The client certificate's CN is no principal, so
# a call without the token is UNAUTHENTICATED.
TOKEN = "example-token-0123456789"
AUTH_FILE = f"""\
principals:
  - name: example-app
    token_sha256: {hashlib.sha256(TOKEN.encode()).hexdigest()}
    rules:
      - {{verbs: [manage, read, consume], queues: ["py.*"]}}
"""


@pytest.fixture(scope="session")
def tickd_addr(tmp_path_factory):
    proc, addr = start_tickd(tmp_path_factory.mktemp("data"))
    try:
        yield addr
    finally:
        stop(proc)


def _key_pem(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certificate(cn, key, issuer_cn, issuer_key, *extensions):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_cn)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def make_pki(directory):
    """Writes a CA (ca.crt), a server certificate for `localhost` (server.crt, server.key) and
    a client certificate with CN example-client (client.crt, client.key) into `directory`."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_usage = x509.KeyUsage(
        digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
        key_encipherment=False, data_encipherment=False, key_agreement=False,
        encipher_only=False, decipher_only=False)
    (directory / "ca.crt").write_bytes(_certificate(
        "tickd example CA", ca_key, "tickd example CA", ca_key,
        (x509.BasicConstraints(ca=True, path_length=None), True), (ca_usage, True)))
    for name, cn, extensions in [
        ("server", "localhost", [
            (x509.SubjectAlternativeName([x509.DNSName("localhost")]), False),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)]),
        ("client", "example-client", [
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)]),
    ]:
        key = ec.generate_private_key(ec.SECP256R1())
        (directory / f"{name}.key").write_bytes(_key_pem(key))
        (directory / f"{name}.crt").write_bytes(_certificate(
            cn, key, "tickd example CA", ca_key,
            (x509.BasicConstraints(ca=False, path_length=None), True), *extensions))


@pytest.fixture(scope="session")
def secured_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    make_pki(directory)
    (directory / "auth.yaml").write_text(AUTH_FILE)
    return directory


@pytest.fixture(scope="session")
def mtls_tickd(tmp_path_factory, secured_files):
    """tickd with TLS, mutual TLS and the auth file. `env` holds the client settings that
    reach it with the token (the address is 127.0.0.1, the certificate says localhost)."""
    d = secured_files
    proc, addr = start_tickd(
        tmp_path_factory.mktemp("data"), "--tls-cert", d / "server.crt",
        "--tls-key", d / "server.key", "--tls-client-ca", d / "ca.crt",
        "--auth-file", d / "auth.yaml")
    env = {
        "TICKD_ADDR": f"https://{addr}",
        "TICKD_CA_FILE": str(d / "ca.crt"),
        "TICKD_CLIENT_CERT": str(d / "client.crt"),
        "TICKD_CLIENT_KEY": str(d / "client.key"),
        "TICKD_TLS_SERVER_NAME": "localhost",
        "TICKD_TOKEN": TOKEN,
    }
    try:
        yield SimpleNamespace(addr=addr, env=env)
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def token_tickd(tmp_path_factory, secured_files):
    """tickd with the auth file but no TLS (as behind a proxy that ends TLS)."""
    proc, addr = start_tickd(tmp_path_factory.mktemp("data"),
                             "--auth-file", secured_files / "auth.yaml")
    try:
        yield SimpleNamespace(addr=addr, env={"TICKD_ADDR": addr, "TICKD_TOKEN": TOKEN})
    finally:
        stop(proc)
