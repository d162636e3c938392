"""Who may use the desk: the peer's credentials (SO_PEERCRED), not file modes."""

from __future__ import annotations

import errno
import grp
import logging
import os
import pwd
import socket
import struct
from collections.abc import Collection
from dataclasses import dataclass

log = logging.getLogger("provisioner.control")  # the journal's name for it, kept across moves

_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13+


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of a control connection, as the kernel says."""

    pid: int
    uid: int
    gid: int
    #: Primary and supplementary groups at connect time (SO_PEERGROUPS): no race with the
    #: PID, and no need to read /proc (which the unit hides with ProtectProc=invisible).
    groups: frozenset[int] = frozenset()

    @property
    def name(self) -> str:
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return f"uid {self.uid}"


def peer_of(conn: socket.socket) -> Peer:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return Peer(pid, uid, gid, frozenset({gid, *_peer_groups(conn)}))


def _peer_groups(conn: socket.socket) -> tuple[int, ...]:
    size = 4 * 64
    while size <= 4 * 65536:
        try:
            raw = conn.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, size)
        except OSError as e:
            if e.errno == errno.ERANGE:
                size *= 4
                continue
            log.warning("cannot read the peer's groups (SO_PEERGROUPS): %s", e)
            return ()
        return struct.unpack(f"{len(raw) // 4}I", raw)
    return ()


def may_use_desk(
    uid: int,
    gid: int,
    groups: Collection[int],
    *,
    service_uid: int,
    operators_gid: int | None,
) -> bool:
    """The control socket's rule: root, the service's own user, and members of the
    operators' group (primary or supplementary); without that group, only the first two."""
    if uid in (0, service_uid):
        return True
    return operators_gid is not None and (gid == operators_gid or operators_gid in groups)


class Authorizer:
    """Root, the daemon's own user, and the operators' group may use the desk."""

    def __init__(self, operators_group: str, *, service_uid: int | None = None) -> None:
        self.group_name = operators_group
        #: The daemon's own user: this process's, unless a test says otherwise.
        self.service_uid = os.getuid() if service_uid is None else service_uid
        try:
            self.group_id: int | None = grp.getgrnam(operators_group).gr_gid
        except KeyError:
            self.group_id = None
            log.warning(
                "operators' group %s does not exist: only root and the service's user may "
                "use the desk (provisioner install creates it)",
                operators_group,
            )

    def refusal(self, peer: Peer) -> str | None:
        """None when allowed, else the sentence the client is told."""
        if may_use_desk(
            peer.uid,
            peer.gid,
            peer.groups,
            service_uid=self.service_uid,
            operators_gid=self.group_id,
        ):
            return None
        return (
            f"not authorized: {peer.name} (uid {peer.uid}) is not root and not in the "
            f"operators' group {self.group_name}"
        )
