"""The strict local IAM stand-in: moto, patched to enforce what AWS enforces.

``provisioner demo`` and the tests enroll against it instead of AWS. It runs as its own
process (``python -m provisioner.local_iam``, loopback only) so the code under test talks
to it over HTTP with the real boto3; :class:`LocalIamServer` starts and stops it and
drives its control API (faults, clock offset, attempt log, call counts, reset).

What it enforces beyond moto (see ``strict.py``): EnableMFADevice and ResyncMFADevice
take only the device's TOTP codes of two consecutive steps (s-1, s) with s within one
step of the server's step N; unknown users and devices, devices in use, a ninth device
per user, malformed codes, bad device names and paths, deleting an assigned device or a
user who still has one are refused with AWS's error codes and statuses; tags are kept;
Tag/Untag/ListMFADeviceTags and ResyncMFADevice exist; ListVirtualMFADevices never
returns seeds. STS GetSessionToken with SerialNumber/TokenCode checks the code (steps
N-1..N+1, no reuse of a step already used for a login) against an assigned device.

Limitation: moto does not know who calls. With the dummy credentials the caller is the
account, so any assigned device passes the login check; only when the call is signed
with an access key created for an IAM user must the device be that user's.

Importing this package is cheap: it exposes the subprocess client only; moto is
imported by the server process, never here.
"""

from provisioner.local_iam.client import Attempt, LocalIamError, LocalIamServer, aws_env

__all__ = ["Attempt", "LocalIamError", "LocalIamServer", "aws_env"]
