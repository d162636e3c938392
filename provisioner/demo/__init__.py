"""`provisioner demo`: the whole job on a laptop with no YubiKey and no AWS account.

It starts the strict local IAM server (moto, made to check codes the way AWS does) and
emulated YubiKeys, plugged into the real pcscd through vsmartcard's vpcd readers when it
can (root, pcscd and vpcd installed: its own pcscd, or one already serving readers named
like a YubiKey's) and in-process otherwise. It enrolls a few users with exactly the code
`provisioner enroll` runs, proves each token works by logging in with a code computed on
it, shows one enrollment failing half-way and being rolled back, and finally checks,
rather than claims, that nothing is left half done.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import TextIO

from provisioner.core.errors import DemoUnavailable
from provisioner.core.ports import Progress

# What the demo runs on, none of which a plain `pip install provisioner` brings (flask and
# werkzeug: moto[server]'s web server, which the local IAM server's process runs).
SIMULATORS = ("emulated_yubikey", "local_iam_server", "moto", "flask", "werkzeug")


def missing_simulators() -> list[str]:
    return [name for name in SIMULATORS if not _installed(name)]


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # hidden by an import hook, or a broken installation
        return False


def run_demo(
    users: list[str], in_process: bool, out: TextIO, progress: Callable[[], Progress]
) -> int:
    """Run the demo; the simulators are imported here, never by the rest of the product."""
    missing = missing_simulators()
    if missing:
        raise DemoUnavailable(f"the demo needs {', '.join(missing)}, which are not installed")
    from provisioner.demo.scenario import run_demo as run

    return run(users, in_process, out, progress)
