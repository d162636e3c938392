"""The strict local IAM stand-in: moto, patched to enforce what AWS enforces.

``provisioner demo`` and the tests enroll against it instead of AWS. It runs as its own
process (``python -m local_iam_server``, loopback only) so the code under test talks
to it over HTTP with the real boto3; :class:`LocalIamServer` starts and stops it and
drives its control API (faults, clock offset, attempt log, call counts, reset).

What it enforces beyond moto (see ``strict.py``): EnableMFADevice and ResyncMFADevice
take only the device's TOTP codes of two consecutive steps (s-1, s) with s the server's
step N or N-1 (never a step not yet begun); unknown users and devices, devices in use, a
ninth device per user, malformed codes, bad device names and paths, deleting an assigned
device or a user who still has one are refused with AWS's error codes and statuses; tags
are kept; Tag/Untag/ListMFADeviceTags and ResyncMFADevice exist; ListVirtualMFADevices
never returns seeds. STS GetSessionToken with SerialNumber/TokenCode checks the code (steps
N-1..N+1, no reuse of a step already used for a login) against an assigned device.

Authorization (``authorization.py``) is off by default: with the dummy credentials the
caller is the account and may do anything, and any assigned device passes the login
check. Turned on (``set_auth_enforced``), every call must be signed with the key of a
principal (``create_principal``: an IAM user with one policy) and allowed by its
policies on the resource AWS judges it on; SimulatePrincipalPolicy evaluates the same
policies. When the call is signed with an IAM user's key, the login device must be that
user's, enforced or not.

Several accounts (``accounts.py``): moto keeps one IAM per account id, and the
credentials ``sts:AssumeRole`` returns for a role are keyed to the role's account, so a
client made from them sees that account only, with the rules above holding there.
``create_account_role`` makes a role in any 12-digit account; AssumeRole is refused
(403 AccessDenied) unless the role exists and its trust policy allows the caller with
the ``sts:ExternalId`` it asks for. ``set_latency`` delays every call (or the named
Actions) as a real network would; calls are served concurrently.

Importing this package is cheap: it exposes the subprocess client only; moto is
imported by the server process, never here. It only looks for moto (and the web server
that ``moto[server]`` brings) and fails at once if they are missing, where the caller can
say how to install them, rather than in the server process at its first start.
"""

import importlib.util

#: What the server process imports, all brought by ``moto[server]`` (the demo and test extras).
SERVER_NEEDS = ("moto", "flask", "werkzeug")


def _require(modules: tuple[str, ...]) -> None:
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # blocked by an import hook, or None in sys.modules
            found = False
        if not found:
            raise ModuleNotFoundError(
                f"the local IAM server needs {name}, which comes with provisioner's demo and "
                "test extras (pip install 'provisioner[demo]')",
                name=name,
            )


_require(SERVER_NEEDS)

# Only once moto is known to be there.
from local_iam_server.client import (  # noqa: E402
    DEFAULT_ACCOUNT_ID,
    AccountRole,
    Attempt,
    LocalIamError,
    LocalIamServer,
    Principal,
    aws_env,
    trust_policy,
)

__all__ = [
    "DEFAULT_ACCOUNT_ID",
    "AccountRole",
    "Attempt",
    "LocalIamError",
    "LocalIamServer",
    "Principal",
    "aws_env",
    "trust_policy",
]
