"""`queue` and `cancel`: the daemon's waiting requests."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from provisioner.cli.common import (
    ask,
    when,
)
from provisioner.core.errors import (
    EXIT_OK,
    ConfigError,
)

log = logging.getLogger("provisioner")


def print_queue(entries: list[dict[str, Any]], total: object = None) -> None:
    """The first requests the daemon sent, and how many more wait (``total``)."""
    if not entries:
        print("queue: empty")
        return
    print("queue:")
    for e in entries:
        token = f" (token {e['serial']})" if e.get("serial") is not None else ""
        kind = "" if e.get("kind", "enroll") == "enroll" else f"{e['kind']} "
        where = f" in {e['accounts'].replace(',', ', ')}" if e.get("accounts") else ""
        print(
            f"  #{e['id']} {kind}{e['user']}{where}{token}: {e['state']}, asked by "
            f"{e['requested_by']} at {when(e['requested_at'])}"
        )
    if isinstance(total, int) and total > len(entries):
        print(f"  ... and {total - len(entries)} more")


def cmd_queue(args: argparse.Namespace) -> int:
    if args.user:
        request = {"op": "enroll", "user": args.user, "serial": args.serial, "wait": False}
        if args.accounts:
            request["accounts"] = args.accounts
        if args.desk:
            request["desk"] = args.desk
        answer = ask(args, request)
        print(answer.get("detail"))
        return EXIT_OK
    answer = ask(args, {"op": "queue"})
    print_queue(answer.get("queue") or [], answer.get("queue_total"))
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    answer = ask(args, {"op": "cancel", "id": args.id})
    cancelled = answer["cancelled"]
    assert isinstance(cancelled, dict)
    print(f"cancelled #{cancelled['id']} ({cancelled['user']})")
    return EXIT_OK


def cmd_roster_load(args: argparse.Namespace) -> int:
    """The fleet's roster from a CSV (checked as a desk's roster file is), replacing the
    one before."""
    from provisioner.adapters.files import load_roster
    from provisioner.cli import direct
    from provisioner.cli.common import load_config

    config = load_config(args)
    if not config.store.url:
        raise ConfigError(
            "roster load fills the fleet's roster: [store] url names no fleet database",
            hint="a desk of its own reads its roster from daemon.roster",
        )
    roster = load_roster(Path(args.file))
    with direct.desk_state(config) as state:
        count = state.store.load_roster(roster, state.actor)
    print(f"the fleet's roster: {count} tokens from {args.file}")
    return EXIT_OK
