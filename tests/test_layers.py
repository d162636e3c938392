"""The layering is a rule, not a picture: pyproject's import contract, checked by import-linter.

The contract (``[tool.importlinter]`` in pyproject.toml): cli > daemon > wiring > adapters >
core, each layer importing only those below it; the core imports no vendor library and no
I/O module; nothing in the product imports the simulators or moto. The second test proves the
check can fail: the same contract run over a copy of the tree with one forbidden import added.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("provisioner", "emulated_yubikey", "local_iam_server", "desk_harness")
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(top: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(top)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo"],
        cwd=top,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_import_contract_holds() -> None:
    run = lint_imports(ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout


@pytest.fixture
def copy_of_the_tree(tmp_path: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


@pytest.mark.parametrize(
    ("module", "line", "broken", "edge"),
    [
        (
            "provisioner/core/enrollment.py",
            "import boto3",
            "the core is pure",
            "provisioner.core.enrollment -> boto3",
        ),
        (
            "provisioner/core/lifecycle.py",
            "from provisioner.adapters import yubikey",
            "provisioner's layers",
            "provisioner.core.lifecycle -> provisioner.adapters.yubikey",
        ),
        (
            "provisioner/adapters/sqlite_store.py",
            "from provisioner.daemon import service",
            "provisioner's layers",
            "provisioner.adapters.sqlite_store -> provisioner.daemon.service",
        ),
        (
            "provisioner/daemon/service.py",
            "from provisioner.cli import main",
            "provisioner's layers",
            "provisioner.daemon.service -> provisioner.cli.main",
        ),
        (
            "provisioner/adapters/aws/iam.py",
            "import local_iam_server",
            "never imports the simulators",
            "provisioner.adapters.aws.iam -> local_iam_server",
        ),
        (
            "provisioner/demo/__init__.py",
            "import emulated_yubikey",
            "never imports the simulators",
            "provisioner.demo -> emulated_yubikey",
        ),
        (
            "provisioner/daemon/main.py",
            "import desk_harness",
            "never imports the simulators",
            "provisioner.daemon.main -> desk_harness",
        ),
        (
            "provisioner/daemon/service.py",
            "from provisioner.adapters.sqlite_store import SqliteStore",
            "picks the store's adapter",
            "provisioner.daemon.service -> provisioner.adapters.sqlite_store",
        ),
        (
            # The adapter's errors are StoreError: nobody else catches sqlite3's.
            "provisioner/cli/direct.py",
            "import sqlite3",
            "picks the store's adapter",
            "provisioner.cli.direct -> sqlite3",
        ),
        (
            "provisioner/desk.py",
            "import moto",
            "never imports the simulators",
            "provisioner.desk -> moto",
        ),
        (
            # The demo's scenario may load the simulators, never moto itself.
            "provisioner/demo/scenario.py",
            "import moto",
            "never imports the simulators",
            "provisioner.demo.scenario -> moto",
        ),
        (
            "provisioner/adapters/aws/iam.py",
            "from werkzeug import serving",
            "never imports the simulators",
            "provisioner.adapters.aws.iam -> werkzeug",
        ),
    ],
)
def test_the_contract_fails_on_a_forbidden_import(
    copy_of_the_tree: Path, module: str, line: str, broken: str, edge: str
) -> None:
    path = copy_of_the_tree / module
    path.write_text(path.read_text() + f"\n{line}  # a deliberate violation\n")
    run = lint_imports(copy_of_the_tree)
    assert run.returncode == 1, run.stdout + run.stderr
    broken_lines = [x for x in run.stdout.splitlines() if " BROKEN" in x]
    assert any(broken in x for x in broken_lines), run.stdout
    assert edge in run.stdout
