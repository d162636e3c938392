"""HTTPS with a CA of the stand-in's own: trusted through AWS_CA_BUNDLE, and nothing else."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.exceptions import SSLError

from local_iam_server import LocalIamServer

from .helpers import NO_RETRY

pytestmark = pytest.mark.iam_server


@pytest.fixture(scope="module")
def https_server() -> Iterator[LocalIamServer]:
    with LocalIamServer(tls=True) as server:
        yield server


def test_boto3_trusts_the_ca_bundle_and_only_it(https_server: LocalIamServer) -> None:
    assert https_server.endpoint_url.startswith("https://127.0.0.1:")
    bundle = https_server.ca_bundle
    assert bundle is not None and bundle.read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert https_server.aws_env()["AWS_CA_BUNDLE"] == str(bundle)
    https_server.reset()  # the control API speaks HTTPS too
    https_server.set_latency(0.0)
    https_server.admin_client("iam").create_user(UserName="alice")

    def client(verify: str | None) -> Any:
        return boto3.client(
            "iam", endpoint_url=https_server.endpoint_url, region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing",
            config=NO_RETRY, verify=verify,
        )  # fmt: skip

    users = client(str(bundle)).list_users()["Users"]
    assert [u["UserName"] for u in users] == ["alice"]
    with pytest.raises(SSLError):
        client(None).list_users()


def test_a_child_process_uses_the_bundle_from_the_environment(
    https_server: LocalIamServer,
) -> None:
    script = "import boto3; print(boto3.client('sts').get_caller_identity()['Account'])"
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=https_server.aws_env() | {"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "123456789012"


def test_the_ca_is_removed_when_the_server_stops() -> None:
    server = LocalIamServer(tls=True).start()
    bundle = server.ca_bundle
    assert bundle is not None and bundle.exists()
    server.stop()
    assert server.ca_bundle is None and not bundle.exists()


def test_a_connection_is_kept_between_calls_as_aws_keeps_it(
    https_server: LocalIamServer,
) -> None:
    """One TLS handshake for many calls: no answer closes the connection. (That a kept
    connection's answers do not wait for the client's delayed ACK is a speed: the bench
    shows it, bench/ahead.py.)"""
    import http.client
    import ssl

    https_server.reset()
    host, port = https_server.endpoint_url.removeprefix("https://").split(":")
    assert https_server.ca_bundle is not None
    context = ssl.create_default_context(cafile=str(https_server.ca_bundle))
    connection = http.client.HTTPSConnection(host, int(port), context=context, timeout=5)
    body = "Action=ListUsers&Version=2010-05-08"
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "Authorization": "AWS4-HMAC-SHA256 Credential=testing/20240101/us-east-1/iam/"
        "aws4_request, SignedHeaders=host, Signature=0",
    }
    sockets = set()
    try:
        for _ in range(5):
            connection.request("POST", "/", body=body, headers=headers)
            answer = connection.getresponse()
            assert answer.status == 200 and answer.getheader("Connection") != "close"
            answer.read()
            sockets.add(id(connection.sock))
    finally:
        connection.close()
    assert len(sockets) == 1  # the same connection throughout
