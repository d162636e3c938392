"""The emulated YubiKey and the local IAM server stand apart from the product: a plain
install brings no moto, the daemon and the CLI never import a simulator, and `provisioner
demo` says how to install them when they are missing."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

from packaging.requirements import Requirement

SIMULATORS = ("emulated_yubikey", "local_iam_server", "moto")


def _imported_by(code: str) -> set[str]:
    """The modules `python -X importtime -c code` imports (their top-level names)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    names = set()
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


def test_the_daemon_and_the_cli_import_no_simulator() -> None:
    imported = _imported_by("import provisioner.daemon.main, provisioner.cli.main")
    assert "provisioner" in imported  # the measurement sees our own imports
    assert not imported & set(SIMULATORS)


def test_the_demo_imports_its_simulators() -> None:
    # the other side of the check above: importtime does see a simulator when one is imported
    assert "emulated_yubikey" in _imported_by("import provisioner.demo.scenario")


def test_a_plain_install_requires_no_moto() -> None:
    requires = [Requirement(r) for r in importlib.metadata.requires("provisioner") or []]
    plain = [r.name for r in requires if r.marker is None]
    assert plain and "moto" not in plain
    extras = {
        r.name for r in requires if r.marker is not None and r.marker.evaluate({"extra": "demo"})
    }
    assert "moto" in extras


def test_demo_without_simulators_says_how_to_install_them() -> None:
    # As on a plain install: the simulators cannot be found (a None in sys.modules hides them).
    code = (
        "import sys\n"
        "for name in ('moto', 'local_iam_server'): sys.modules[name] = None\n"
        "from provisioner.cli.main import main\n"
        "sys.exit(main(['demo']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "local_iam_server, moto" in done.stderr
    assert "pip install 'provisioner[demo]'" in done.stderr
    assert done.stdout == ""
