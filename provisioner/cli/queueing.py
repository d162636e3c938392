"""`queue` and `cancel`: the daemon's waiting requests."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from provisioner.cli.common import (
    ask,
    when,
)
from provisioner.core.errors import (
    EXIT_OK,
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
