"""HTTPS for the stand-in, with a CA of its own, so a client's TLS handshake is counted.

Over plain HTTP a cold boto3 client skips the handshake AWS makes it pay; the bench needs
it in the measurement (issue 14). The server makes a throwaway CA and a certificate for
the loopback names in a directory it is given; a client trusts that CA alone through
``AWS_CA_BUNDLE``. Imported by the server process only (``cryptography`` comes with moto).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CA_FILE = "ca.pem"  # what AWS_CA_BUNDLE points at
_CERT_FILE = "server.pem"
_KEY_FILE = "server-key.pem"
_VALIDITY = datetime.timedelta(days=2)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: str, issuer: str, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
    )


def _write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


def make_certificates(directory: Path, host: str) -> Path:
    """A CA and a server certificate for ``host``, localhost and 127.0.0.1/::1 in
    ``directory``; returns the CA file."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        _builder("local-iam test CA", "local-iam test CA", ca_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        names.append(x509.DNSName(host))
    else:
        if x509.IPAddress(address) not in names:
            names.append(x509.IPAddress(address))
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        _builder("local-iam", "local-iam test CA", key)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    _write(
        directory / _KEY_FILE,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    _write(directory / _CERT_FILE, certificate.public_bytes(serialization.Encoding.PEM))
    _write(directory / CA_FILE, ca.public_bytes(serialization.Encoding.PEM))
    return directory / CA_FILE


def server_context(directory: Path, host: str) -> ssl.SSLContext:
    """A TLS server context with a fresh certificate signed by a fresh CA in ``directory``."""
    make_certificates(directory, host)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(directory / _CERT_FILE, directory / _KEY_FILE)
    return context
