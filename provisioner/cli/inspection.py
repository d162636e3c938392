"""`tokens`, `status`, `doctor`, `watch`, `history`, `reconcile`: what the desk sees."""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from provisioner.cli.common import (
    ask,
    ask_daemon,
    load_config,
    running_daemon,
    setup_logging,
    through_daemon,
    when,
)
from provisioner.cli.queueing import print_queue
from provisioner.config import Config
from provisioner.core.audit import spreadsheet_safe
from provisioner.core.errors import (
    EXIT_FAILED,
    EXIT_OK,
    ConfigError,
    DaemonNotRunning,
    DaemonRefused,
    InvalidInput,
)
from provisioner.core.messages import EventKind, TokenState
from provisioner.core.store import DeskBeat

log = logging.getLogger("provisioner")


# --- tokens ----------------------------------------------------------------------------------


def cmd_tokens(args: argparse.Namespace) -> int:
    from provisioner.adapters.yubikey import Pcsc, list_tokens
    from provisioner.core.model import TokenInfo

    config = load_config(args)
    if args.inventory:
        return _inventory(config, args)
    if args.user or args.serial is not None:
        raise InvalidInput("--user and --serial go with --inventory")
    setup_logging(config.log_level)
    with Pcsc() as pcsc:
        entries = list_tokens(pcsc)
    if not entries:
        print("no smart card readers (is a YubiKey plugged in? is pcscd running?)")
        return EXIT_OK
    for entry in entries:
        if isinstance(entry, TokenInfo):
            oath = "OATH" if entry.has_oath else "no OATH"
            serial = entry.serial if entry.serial is not None else "hidden"
            print(
                f"{entry.reader}: YubiKey serial {serial}, firmware {entry.firmware_text}, "
                f"{entry.form_factor}, {oath}"
            )
        else:
            print(f"{entry.name}: {'card present (unreadable)' if entry.card_present else 'empty'}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    if args.desk:
        return _desks_once(load_config(args), args.desk, args.json)
    answer = ask(args, {"op": "status"})
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
        return EXIT_OK
    daemon = answer["daemon"]
    assert isinstance(daemon, dict)
    print(
        f"desk {daemon['desk']}: daemon up since {when(daemon['since'])}, "
        f"pcscd {daemon['pcsc']}, IAM at {daemon['iam']}, roster of {daemon['roster']}"
        + (f", accounts {', '.join(daemon['accounts'])}" if daemon.get("accounts") else "")
    )
    readers = answer.get("readers") or []
    tokens = {t["reader"]: t for t in answer.get("tokens") or []}
    print("readers:" if readers else "readers: none")
    for reader in readers:
        token = tokens.get(reader["name"])
        if token is None:
            what = "card present" if reader["card_present"] else "empty"
        else:
            serial = token["serial"] if token.get("serial") is not None else "?"
            what = f"token {serial}: {token.get('detail') or token['state']}"
            if token.get("user"):
                what += f" for {token['user']}"
            if token["state"] == TokenState.ENROLLING and token.get("step"):
                what += f" (step {token['step']})"
        print(f"  {reader['name']}: {what}")
    print_queue(answer.get("queue") or [], answer.get("queue_total"))
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    from provisioner import doctor
    from provisioner.adapters.usb import list_yubikeys
    from provisioner.desk import Desk

    config = load_config(args)

    desk: list[Desk] = []

    def iam() -> tuple[Any, Any]:
        desk.append(Desk.from_config(config))
        return desk[0].iam, desk[0].clock

    findings = doctor.run(
        config,
        iam=iam,
        list_usb=list_yubikeys,
        root=Path(args.root),
        sample_user=args.user,
        directory=lambda account: desk[0].directory(account),
    )
    if args.json:
        print(json.dumps([vars(f) for f in findings], indent=2))
    else:
        for finding in findings:
            print(finding.line())
    failed = [f for f in findings if f.status is doctor.Status.FAIL]
    if failed and not args.json:
        print(f"{len(failed)} check(s) failed", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


def cmd_watch(args: argparse.Namespace) -> int:
    """Redraw the desk after each event the daemon sends; Ctrl-C ends it."""
    import shutil

    from provisioner.adapters.control_socket import ControlClient
    from provisioner.cli.watch import CLEAR, render
    from provisioner.daemon.service import HEARTBEAT_SECONDS

    if args.desk:
        return _watch_desks(load_config(args), args.desk, once=args.once)
    path = running_daemon(args)
    redraw = sys.stdout.isatty() and not args.once
    try:
        with ControlClient(path) as client:
            # Several missed heartbeats in a row: the daemon is gone or wedged.
            for update in client.request({"op": "watch"}, timeout=HEARTBEAT_SECONDS * 5):
                if update.get("event") == EventKind.HEARTBEAT:
                    continue
                if not update.get("ok"):
                    raise DaemonRefused.answered(update)
                width = shutil.get_terminal_size().columns if redraw else 200
                frame = "\n".join(render(update, now=time.time(), width=width))
                sys.stdout.write(f"{CLEAR}{frame}\n" if redraw else f"{frame}\n\n")
                sys.stdout.flush()
                if args.once:
                    return EXIT_OK
    except (ConnectionError, OSError) as e:
        raise DaemonNotRunning(
            f"lost the desk daemon ({e})", hint="systemctl status provisioner"
        ) from e
    except KeyboardInterrupt:
        return EXIT_OK
    return EXIT_OK


def _verify_history(args: argparse.Namespace) -> int:
    """Walk every desk's hash chain; one line per desk, the first broken record named."""
    from provisioner.cli import direct

    config = load_config(args)
    walk = direct.verify_trail(config)
    if walk is None:
        print(f"provisioner: no audit trail yet ({config.desk})", file=sys.stderr)
        return EXIT_OK
    for desk, count in sorted(walk.checked.items()):
        if desk not in walk.broken:
            print(f"desk {desk or '(unnamed)'}: {count} records, chain intact")
    if walk.unchained:
        print(f"{walk.unchained} records from before the chain (not checked)")
    for broken in walk.broken.values():
        print(f"provisioner: BROKEN: {broken.line()}", file=sys.stderr)
    return EXIT_FAILED if walk.broken else EXIT_OK


def cmd_history(args: argparse.Namespace) -> int:
    from provisioner.cli import direct
    from provisioner.core.audit import render

    if args.verify:
        return _verify_history(args)
    request: dict[str, Any] = {"op": "history", "limit": args.limit}
    if args.user:
        request["user"] = args.user
    if args.serial is not None:
        request["serial"] = args.serial
    if args.since is not None:
        request["since"] = args.since
    if args.account is not None:
        request["account"] = args.account
    if args.desk is not None:
        request["desk"] = args.desk
    config = load_config(args)
    socket_path = through_daemon(config)
    if socket_path is not None:
        records = ask_daemon(socket_path, request).get("history") or []
    else:
        # No daemon answers: the trail itself, read-only, with the same filters.
        found = direct.history(
            config,
            limit=args.limit,
            user=request.get("user"),
            serial=request.get("serial"),
            since=request.get("since"),
            account=request.get("account"),
            desk=request.get("desk"),
        )
        if found is None:
            from provisioner.desk import state_file

            where = state_file(config)
            print(f"provisioner: no audit trail at {where} yet", file=sys.stderr)
        records = found or []
    print(render(records, "json" if args.json else args.format))
    return EXIT_OK


def cmd_reconcile(args: argparse.Namespace) -> int:
    request = {
        "op": "reconcile",
        "dry_run": args.dry_run,
        "keep_orphans": args.keep_orphans,
        "all_desks": args.all_desks,
    }
    if args.desk:
        request["desk"] = args.desk
    config = load_config(args)
    setup_logging(config.log_level)
    socket_path = through_daemon(config)
    if socket_path is not None:
        actions = ask_daemon(socket_path, request)["actions"]
    else:
        actions = [a.text for a in _reconcile_here(config, args)]
    for text in actions:
        print(text)
    if not actions:
        print("nothing to do: every enrollment finished, no orphaned devices")
    return EXIT_OK


def _reconcile_here(config: Config, args: argparse.Namespace) -> list[Any]:
    from provisioner.cli import direct
    from provisioner.desk import Desk, state_file

    state = state_file(config)
    if not state.exists():
        raise ConfigError(f"no desk state at {state}", hint="check daemon.state_directory")
    desk = Desk.from_config(config)
    password = config.oath_password()
    # Records it takes over are its own while it settles them: a daemon starting meanwhile
    # (or another reconcile) leaves them alone.
    with direct.desk_state(config) as here:
        return desk.recovery(here.store, password).run(
            dry_run=args.dry_run,
            delete_orphans=not args.keep_orphans,
            all_desks=args.all_desks,
            desk=args.desk,
        )


# --- the fleet -----------------------------------------------------------------------------

#: A desk that has not beaten for this long is shown as silent (three missed beats).


def cmd_fleet(args: argparse.Namespace) -> int:
    """Every desk of the fleet: alive or silent since when, what it does, its last outcome."""
    from provisioner.cli import direct

    config = load_config(args)
    desks = direct.fleet(config)
    now = time.time()
    if args.json:
        print(json.dumps([desk_json(d, now) for d in desks], indent=2))
        return EXIT_OK
    if not desks:
        print("fleet: no desk has written a heartbeat yet (is the daemon running?)")
        return EXIT_OK
    for desk in desks:
        print(fleet_line(desk, now))
    return EXIT_OK


def desk_json(desk: DeskBeat, now: float) -> dict[str, object]:
    """A heartbeat for scripts: its fields, its status parsed, and whether it beats."""
    return {**desk.as_dict(), "status": json.loads(desk.status), "state": desk.state(now)}


def fleet_line(desk: DeskBeat, now: float) -> str:
    status = json.loads(desk.status or "{}")
    if desk.state(now) == "stopped":
        state = f"stopped at {when(desk.stopped_at)}"
    elif desk.state(now) == "silent":
        state = f"SILENT since {when(desk.beat_at)}"
    else:
        state = f"alive (beat {desk.silent_for(now):.0f} s ago)"
    working = status.get("working") or []
    doing = (
        "; working: "
        + ", ".join(f"{w.get('user')} in {w.get('reader')} ({w.get('step')})" for w in working)
        if working
        else "; idle"
    )
    last = status.get("last_outcome")
    after = (
        f"; last: {last.get('outcome')} {last.get('user')} at {when(last.get('at'))}"
        if last
        else ""
    )
    readers = len(status.get("readers") or [])
    return (
        f"{desk.name}: {state}, version {desk.version}, pid {desk.pid}, up since "
        f"{when(desk.started_at)}; {readers} readers, {status.get('tokens', 0)} tokens"
        f"{doing}{after}"
    )


INVENTORY_FIELDS = ("serial", "state", "users", "accounts", "firmware", "desk", "changed_at")


def _inventory(config: Config, args: argparse.Namespace) -> int:
    """Every token the fleet (or this desk) has seen, with where and when it changed."""
    from provisioner.cli import direct

    records = direct.inventory(config, user=args.user, serial=args.serial)
    rows = [
        {**{k: r.as_dict()[k] for k in INVENTORY_FIELDS}, "changed_at": when(r.changed_at)}
        for r in records
    ]
    if args.format == "json":
        print(json.dumps(rows, indent=2))
    elif args.format == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=INVENTORY_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: spreadsheet_safe(v) for k, v in row.items()} for row in rows)
        print(out.getvalue(), end="")
    elif not rows:
        print("inventory: no token seen yet")
    else:
        for row in rows:
            users = row["users"].replace(";", ", ") or "nobody"
            accounts = f" in {row['accounts'].replace(';', ', ')}" if row["accounts"] else ""
            print(
                f"token {row['serial']}: {row['state']}, {users}{accounts}; firmware "
                f"{row['firmware'] or '?'}; last changed at desk {row['desk']} "
                f"{row['changed_at']}"
            )
    return EXIT_OK


def cmd_lost(args: argparse.Namespace) -> int:
    """Revoke everything a lost token holds, from any desk."""
    from provisioner.cli import direct
    from provisioner.desk import Desk

    config = load_config(args)
    setup_logging(config.log_level)
    desk = Desk.from_config(config)
    with direct.desk_state(config) as state:
        done = direct.lost(state, desk, args.serial)
    for account, revoked in done:
        where = f" in {account}" if account else ""
        print(f"revoked {revoked.user}{where}: {revoked.device_arn}")
    print(
        f"token {args.serial} marked lost: {len(done)} devices revoked; its credentials are "
        "removed if it is ever plugged in at a desk"
    )
    return EXIT_OK


def _desks(config: Config, name: str) -> list[DeskBeat]:
    """The heartbeats of desk ``name`` (every desk's for 'all'); InvalidInput if the
    fleet has no such desk."""
    from provisioner.cli import direct

    beats = direct.fleet(config)
    chosen = beats if name == "all" else [b for b in beats if b.name == name]
    if not chosen:
        known = ", ".join(b.name for b in beats) or "none yet"
        raise InvalidInput(f"no desk {name!r} in the fleet (desks: {known})")
    return chosen


def _desks_once(config: Config, name: str, as_json: bool) -> int:
    chosen = _desks(config, name)
    if as_json:
        print(json.dumps([desk_json(d, time.time()) for d in chosen], indent=2))
    else:
        now = time.time()
        for desk in chosen:
            print(fleet_line(desk, now))
    return EXIT_OK


def _watch_desks(config: Config, name: str, *, once: bool) -> int:
    """Another desk's (or every desk's) heartbeats as they change; Ctrl-C ends it."""
    shown: dict[str, tuple[str, str]] = {}
    try:
        while True:
            now = time.time()
            for desk in _desks(config, name):
                # what it does, and whether it beats: not how long ago it last did
                seen = (desk.status, desk.state(now))
                if shown.get(desk.name) != seen:
                    shown[desk.name] = seen
                    print(f"{time.strftime('%H:%M:%S')}  {fleet_line(desk, now)}", flush=True)
            if once:
                return EXIT_OK
            time.sleep(2.0)
    except KeyboardInterrupt:
        return EXIT_OK
