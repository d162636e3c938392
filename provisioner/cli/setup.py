"""`daemon`, `install`, `demo`: running and setting up a desk."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from provisioner.cli.common import (
    TerminalProgress,
    load_config,
    setup_logging,
)
from provisioner.core.errors import (
    EXIT_OK,
)

log = logging.getLogger("provisioner")


# --- the daemon and its clients ------------------------------------------------------------


def cmd_daemon(args: argparse.Namespace) -> int:
    from provisioner.daemon.main import run

    config = load_config(args)
    setup_logging(config.log_level)
    return run(config)


def cmd_install(args: argparse.Namespace) -> int:
    from provisioner.install import install, uninstall

    root = Path(args.root)
    if args.remove:
        lines = uninstall(root, reload=not args.no_reload)
    else:
        lines = install(root, args.executable, reload=not args.no_reload)
    for line in lines:
        print(line)
    return EXIT_OK


# --- demo ------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from provisioner.demo import run_demo

    setup_logging("debug" if args.debug else "warning")
    return run_demo(
        users=args.users,
        in_process=args.in_process,
        out=sys.stdout,
        progress=lambda: TerminalProgress(sys.stdout, prefix="  "),
    )


# --- the fleet's database ------------------------------------------------------------------


def cmd_store_migrate(args: argparse.Namespace) -> int:
    """Create or upgrade the fleet's schema as the database's owner, and grant the desks'
    role what desks need."""
    from provisioner.desk import postgres

    store = postgres()
    before, after = store.migrate(args.url, args.desk_role)
    where = store.shown(args.url)
    if before == after:
        print(f"{where}: schema version {after} already; grants to {args.desk_role} renewed")
    else:
        print(
            f"{where}: schema version {before} -> {after}; {args.desk_role} granted what desks need"
        )
    return EXIT_OK
