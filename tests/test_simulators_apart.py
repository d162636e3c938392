"""The emulated YubiKey and the local IAM server stand apart from the product: a plain
install brings no moto, the daemon and the CLI never import a simulator, and `provisioner
demo` says how to install them when they are missing."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
SIMULATORS = ("emulated_yubikey", "local_iam_server", "moto")
#: What only the simulators may load: them, their test harness, moto and moto[server]'s web server.
SIMULATOR_ONLY = (*SIMULATORS, "desk_harness", "flask", "werkzeug")
INSTALL_HINT = "pip install 'provisioner[demo]'"


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


def _extra_free(requirements: list[str]) -> list[Requirement]:
    """What a plain install pulls in: the requirements whose marker holds with no extra."""
    parsed = [Requirement(r) for r in requirements]
    return [r for r in parsed if r.marker is None or r.marker.evaluate({"extra": ""})]


def test_pyproject_asks_for_moto_only_in_the_extras() -> None:
    # The tree's own pyproject, in case the installed metadata above is an older install's.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    plain = {canonicalize_name(r.name) for r in _extra_free(project["dependencies"])}
    assert plain and not plain & set(SIMULATOR_ONLY), plain
    for extra in ("demo", "test"):
        requires = project["optional-dependencies"][extra]
        assert "moto" in {canonicalize_name(Requirement(r).name) for r in requires}


def test_nothing_a_plain_install_pulls_in_needs_moto() -> None:
    """The whole tree of a plain install, as pip would resolve it here, holds no moto."""
    seen: set[str] = set()
    todo = [r.name for r in _extra_free(importlib.metadata.requires("provisioner") or [])]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            todo += [r.name for r in _extra_free(importlib.metadata.requires(name) or [])]
        except importlib.metadata.PackageNotFoundError:
            continue  # a dependency only on another platform
    assert {"boto3", "yubikey-manager", "pyscard"} <= seen  # the walk did walk
    assert not seen & set(SIMULATOR_ONLY), sorted(seen & set(SIMULATOR_ONLY))


# Every module of the product but the demo, imported with the `import` machinery that
# -X importtime reports on (importlib.import_module is not timed); then what got loaded.
_IMPORT_THE_PRODUCT = """
import json, pkgutil, sys
import provisioner
for found in pkgutil.walk_packages(provisioner.__path__, "provisioner."):
    if not found.name.startswith(("provisioner.demo", "provisioner.__main__")):
        __import__(found.name)
print(json.dumps(sorted(sys.modules)))
"""


def test_no_module_of_the_product_but_the_demo_loads_a_simulator() -> None:
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", _IMPORT_THE_PRODUCT],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    timed = {
        line.rsplit("|", 1)[1].strip()
        for line in run.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    loaded = set(json.loads(run.stdout))
    assert {"provisioner.daemon.service", "provisioner.adapters.yubikey"} <= timed & loaded
    assert not {m for m in timed | loaded if m.partition(".")[0] in SIMULATOR_ONLY}


# `provisioner demo` with one module as if not installed: an import hook that finds nothing
# for it (so `import` fails and importlib.util.find_spec raises), or None in sys.modules.
_DEMO_WITHOUT = """
import runpy, sys

missing, how = sys.argv[1], sys.argv[2]

class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == missing:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

if how == "hook":
    sys.meta_path.insert(0, NotInstalled())
else:
    sys.modules[missing] = None
sys.argv = ["provisioner", "demo", "--in-process"]
runpy.run_module("provisioner", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize(
    ("missing", "how"),
    [("moto", "hook"), ("emulated_yubikey", "hook"), ("flask", "hook"), ("werkzeug", "none")],
)
def test_the_demo_names_what_is_missing_in_one_line(missing: str, how: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    run = subprocess.run(
        [sys.executable, "-c", _DEMO_WITHOUT, missing, how],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stdout == ""
    (line,) = run.stderr.splitlines()
    assert line == (
        f"provisioner: the demo needs {missing}, which are not installed"
        f" (install them with: {INSTALL_HINT})"
    )


@pytest.mark.parametrize("missing", ["moto", "flask"])
def test_the_local_iam_server_is_importable_only_with_the_extras(missing: str) -> None:
    """Without moto[server] it fails at import, naming what is missing and where it comes
    from, rather than later in the server's own process."""
    code = (
        "import sys\n"
        f"sys.modules[{missing!r}] = None\n"
        "try:\n"
        "    import local_iam_server\n"
        "except ModuleNotFoundError as e:\n"
        "    print(e.name, '|', e)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    name, _, message = run.stdout.strip().partition(" | ")
    assert name == missing
    assert f"needs {missing}" in message and INSTALL_HINT in message
