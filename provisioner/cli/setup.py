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
    ConfigError,
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


def cmd_store_import(args: argparse.Namespace) -> int:
    """A desk's SQLite history into the fleet's database, as this desk's (or --desk's)."""
    from provisioner.desk import desk_store, postgres

    config = load_config(args)
    if not config.store.url:
        raise ConfigError(
            "import-sqlite moves a desk's history into the fleet: [store] url names none",
            hint="set [store] url (and password_file) to the fleet's database first",
        )
    desk = args.desk or config.desk
    fleet = desk_store(config)
    try:
        done = postgres("postgres_import").import_sqlite(fleet, Path(args.file), desk)
    finally:
        fleet.close()
    print(f"{args.file} -> the fleet, as desk {desk}: {done.line()}")
    return EXIT_OK
