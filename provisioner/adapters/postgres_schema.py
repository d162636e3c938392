"""The fleet's PostgreSQL schema: versioned migrations, applied by the database's owner
(`provisioner store migrate --url OWNER_URL`), and the grants that give the desks' role
exactly what desks need.

The tables belong to the owner, never to the desks' role: the desks may read and write
the queue, the enrollments and the credentials to clean, and may only INSERT and SELECT
the audit trail (no UPDATE, DELETE or TRUNCATE: append-only by the database's grants,
whatever a desk's code does). Each migration runs in one transaction with the version it
brings; a desk refuses to start on a schema it does not know (older or newer) and says
the command to run.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

#: The schema this version of provisioner reads and writes.
SCHEMA_VERSION = 1
#: The role desks log in as, unless the migration is told another.
DESK_ROLE = "provisioner_desk"
_ROLE = re.compile(r"[a-z_][a-z0-9_$]{0,62}")

#: version -> the SQL that brings the schema from the version before to it.
MIGRATIONS: dict[int, str] = {
    1: """
CREATE TABLE schema_version (
    version integer NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE queue (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    "user" text NOT NULL,
    serial bigint,
    requested_by text NOT NULL,
    requested_at double precision NOT NULL,
    state text NOT NULL DEFAULT 'waiting',
    enrollment_id bigint,
    kind text NOT NULL DEFAULT 'enroll',
    old_serial bigint,
    followed integer NOT NULL DEFAULT 0,
    accounts text NOT NULL DEFAULT '',
    desk text,
    taken_by text,
    origin text UNIQUE                 -- imported: where from (store import-sqlite)
);
CREATE INDEX queue_by_state ON queue (state, id);
CREATE TABLE enrollments (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    "user" text NOT NULL,
    serial bigint,
    reader text NOT NULL,
    source text NOT NULL,
    started_at double precision NOT NULL,
    finished_at double precision,
    step text NOT NULL,
    device_arn text,
    outcome text NOT NULL DEFAULT 'in progress',
    reason text,
    credential_id text,
    device_state text NOT NULL DEFAULT 'none',
    credential_state text NOT NULL DEFAULT 'none',
    owner text,
    owner_pid integer,
    account text NOT NULL DEFAULT '',
    batch bigint,
    desk text NOT NULL,
    origin text UNIQUE
);
CREATE INDEX enrollments_unfinished ON enrollments (id) WHERE finished_at IS NULL;
CREATE TABLE token_cleanups (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    serial bigint NOT NULL,
    credential_id text NOT NULL,
    enrollment_id bigint,
    reason text NOT NULL,
    created_at double precision NOT NULL,
    done_at double precision,
    origin text UNIQUE
);
CREATE TABLE audit (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at double precision NOT NULL,
    actor text NOT NULL,
    event text NOT NULL,
    "user" text,
    serial bigint,
    device_arn text,
    outcome text,
    reason text,
    account text,
    desk text NOT NULL,
    prev_hash text,
    hash text NOT NULL,
    origin text UNIQUE
);
CREATE INDEX audit_chain ON audit (desk, id);
CREATE TABLE roster (
    serial bigint PRIMARY KEY,
    "user" text NOT NULL,
    accounts text NOT NULL DEFAULT '',
    taken_by text
);
CREATE TABLE tokens (
    serial bigint PRIMARY KEY,
    state text NOT NULL,
    users text NOT NULL DEFAULT '',
    accounts text NOT NULL DEFAULT '',
    firmware text,
    desk text,
    changed_at double precision NOT NULL,
    first_seen_at double precision NOT NULL
);
CREATE TABLE desks (
    name text PRIMARY KEY,
    version text NOT NULL,
    pid integer NOT NULL,
    started_at double precision NOT NULL,
    beat_at double precision NOT NULL,
    status text NOT NULL,
    stopped_at double precision
);
""",
}


#: What the desks' role may do, no more ({role}: the role, quoted by the driver).
GRANTS = (
    "GRANT USAGE ON SCHEMA public TO {role}",
    "GRANT SELECT ON schema_version TO {role}",
    "GRANT SELECT, INSERT, UPDATE ON queue, enrollments, token_cleanups, desks, tokens TO {role}",
    "GRANT SELECT, INSERT, UPDATE, DELETE ON roster TO {role}",
    "GRANT SELECT, INSERT ON audit TO {role}",
    "REVOKE UPDATE, DELETE, TRUNCATE ON audit FROM {role}",
)


def desk_role_name(name: str) -> str:
    """A role name the migration accepts (PostgreSQL's unquoted identifiers)."""
    if not _ROLE.fullmatch(name):
        raise ValueError(f"{name!r} is not a role name (lower-case letters, digits, _)")
    return name


def installed_version(value: Callable[[str], Any]) -> int:
    """The schema's version in the database (``value(sql)`` gives a query's one value):
    0 when there is none yet."""
    if not value("SELECT to_regclass('schema_version') IS NOT NULL AS present"):
        return 0
    return int(value("SELECT COALESCE(MAX(version), 0) AS version FROM schema_version"))
