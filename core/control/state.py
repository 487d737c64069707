"""Runtime state: next-boot overrides, boot events, relay heartbeats.

SQLite in WAL mode, the embedded default.  The schema carries a version
(``PRAGMA user_version``) and is brought up to date by the ordered
:data:`MIGRATIONS` when the database opens; a database written by a newer
SLIM is refused rather than guessed at.

This class is synchronous and owns one connection; the gRPC core calls it
from one dedicated thread so the event loop never waits on the disk.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from slim.core.control.auth import TokenRecord
from slim.errors import FailedPrecondition, InvalidArgument
from slim.vocabulary import MAX_STORED_TEXT

MIGRATIONS: tuple[str, ...] = (
    # 1: the first schema
    """
    CREATE TABLE next_boot (
        node        TEXT PRIMARY KEY,
        environment TEXT NOT NULL,
        set_by      TEXT NOT NULL,
        set_at      REAL NOT NULL
    );
    CREATE TABLE boot_events (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        node        TEXT NOT NULL,
        boot_id     TEXT NOT NULL,
        stage       TEXT NOT NULL,
        time        REAL NOT NULL,
        relay       TEXT NOT NULL,
        bytes       INTEGER NOT NULL,
        ok          INTEGER NOT NULL,
        message     TEXT NOT NULL,
        environment TEXT NOT NULL,
        received_at REAL NOT NULL
    );
    CREATE INDEX boot_events_node ON boot_events (node, id);
    CREATE TABLE relay_heartbeats (
        relay            TEXT PRIMARY KEY,
        load             REAL NOT NULL,
        active_transfers INTEGER NOT NULL,
        egress_bps       REAL NOT NULL,
        cache_bytes      INTEGER NOT NULL,
        healthy          INTEGER NOT NULL,
        message          TEXT NOT NULL,
        last_seen        REAL NOT NULL
    );
    """,
    # 2: how long a stage took (relays time their own transfers); boots by id
    """
    ALTER TABLE boot_events ADD COLUMN duration REAL NOT NULL DEFAULT 0;
    CREATE INDEX boot_events_boot ON boot_events (boot_id);
    """,
    # 3: pruning old events by when they arrived
    """
    CREATE INDEX boot_events_received ON boot_events (received_at);
    """,
    # 4: admin and node tokens (the secret only hashed)
    """
    CREATE TABLE tokens (
        id          TEXT PRIMARY KEY,
        kind        TEXT NOT NULL,
        name        TEXT NOT NULL,
        hash        TEXT NOT NULL,
        created     REAL NOT NULL,
        expires     REAL,
        revoked_at  REAL
    );
    """,
    # 5: desktop harvesting: what SLIM did to each desktop this window, each pool's marks
    """
    CREATE TABLE harvest (
        key    TEXT PRIMARY KEY,
        record TEXT NOT NULL
    );
    """,
    # 6: the boot key a running environment proves its boot with (its SHA-256; the agent's
    # switch_root event carries it)
    """
    ALTER TABLE boot_events ADD COLUMN boot_key_sha256 TEXT NOT NULL DEFAULT '';
    """,
)
PRUNE_BATCH = 5000  # events deleted per transaction
SCHEMA_VERSION = len(MIGRATIONS)

BOOT_KEY_SHA256_RE = re.compile(r"[0-9a-f]{64}")
EVENT_COLUMNS = "node, boot_id, stage, time, relay, bytes, ok, message, environment, duration, received_at"
# the agent's "plan" event says "ENVIRONMENT sha256:<release digest>" (agent/__main__.py)
_RELEASE_IN_MESSAGE = re.compile(r"\bsha256:[0-9a-f]{64}\b")


@dataclass(frozen=True)
class NextBoot:
    node: str
    environment: str
    set_by: str
    set_at: float


@dataclass(frozen=True)
class BootEvent:
    node: str
    boot_id: str
    stage: str
    time: float
    relay: str = ""
    bytes: int = 0
    ok: bool = True
    message: str = ""
    environment: str = ""
    duration: float = 0.0  # seconds the stage took, ending at ``time``
    # the core's clock when it was recorded (set by the database; not part of an event's value)
    received_at: float = field(default=0.0, compare=False)
    # the agent's plan event: the SHA-256 of the boot key (see boot_key_sha256); not
    # part of an event's value, never answered
    boot_key_sha256: str = field(default="", compare=False, repr=False)


@dataclass(frozen=True)
class RelayBeat:
    relay: str
    load: float
    active_transfers: int
    egress_bps: float
    cache_bytes: int
    healthy: bool
    message: str
    last_seen: float


class State:
    """The core's runtime state in one SQLite file (``":memory:"`` for tests)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            raise FailedPrecondition(f"cannot open state database {self.path}: {exc}") from None
        try:
            self._db.execute("PRAGMA busy_timeout = 5000")
            mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if self.path != ":memory:" and mode != "wal":
                raise FailedPrecondition(f"{self.path}: SQLite refused WAL mode (got {mode})")
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._db.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise FailedPrecondition(f"{self.path} is not a usable SLIM state database: {exc}") from None
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                # SQLite may already have rolled back (RAISE(ROLLBACK), some I/O errors), and
                # a failed COMMIT (a deferred constraint) leaves the transaction open.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def _migrate(self) -> None:
        with self._tx() as db:
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise FailedPrecondition(
                    f"{self.path} has schema version {version}, newer than this SLIM "
                    f"understands ({SCHEMA_VERSION}); upgrade SLIM"
                )
            for number in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[number].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {number + 1}")

    # -- desktop harvesting ----------------------------------------------------
    def save_harvest(self, records: dict[str, str]) -> None:
        """Replace the harvest's records (key -> JSON) with ``records``."""
        with self._tx() as db:
            db.execute("DELETE FROM harvest")
            db.executemany("INSERT INTO harvest (key, record) VALUES (?, ?)", sorted(records.items()))

    def harvest_records(self) -> dict[str, str]:
        with self._lock:
            return {str(k): str(v) for k, v in self._db.execute("SELECT key, record FROM harvest")}

    # -- tokens ----------------------------------------------------------------
    def add_token(self, record: TokenRecord) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO tokens (id, kind, name, hash, created, expires, revoked_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (record.id, record.kind, record.name, record.hash, record.created, record.expires, None),
            )

    def revoke_tokens(self, ids: list[str], now: float) -> None:
        with self._tx() as db:
            db.executemany(
                "UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                [(now, token_id) for token_id in ids],
            )

    def expire_token(self, token_id: str, expires: float) -> None:
        with self._tx() as db:
            db.execute("UPDATE tokens SET expires = ? WHERE id = ?", (expires, token_id))

    def tokens(self) -> list[TokenRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, kind, name, hash, created, expires, revoked_at FROM tokens"
            ).fetchall()
        return [TokenRecord(*row) for row in rows]

    # -- next-boot overrides -------------------------------------------------
    def set_next_boot(self, node: str, environment: str, set_by: str, now: float | None = None) -> NextBoot:
        nb = NextBoot(
            node, environment, (set_by or "unknown")[:MAX_STORED_TEXT], time.time() if now is None else now
        )
        with self._tx() as db:
            db.execute(
                "INSERT INTO next_boot (node, environment, set_by, set_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (node) DO UPDATE SET environment = excluded.environment, "
                "set_by = excluded.set_by, set_at = excluded.set_at",
                (nb.node, nb.environment, nb.set_by, nb.set_at),
            )
        return nb

    def clear_next_boot(self, node: str) -> bool:
        with self._tx() as db:
            return db.execute("DELETE FROM next_boot WHERE node = ?", (node,)).rowcount > 0

    def next_boots(self) -> dict[str, NextBoot]:
        with self._lock:
            rows = self._db.execute("SELECT node, environment, set_by, set_at FROM next_boot").fetchall()
        return {r[0]: NextBoot(*r) for r in rows}

    # -- boot events ---------------------------------------------------------
    def add_boot_events(self, events: list[BootEvent], now: float | None = None) -> int:
        received = time.time() if now is None else now
        for e in events:
            if not e.node or not e.stage:
                raise InvalidArgument("a boot event needs a node and a stage")
        with self._tx() as db:
            db.executemany(
                "INSERT INTO boot_events (node, boot_id, stage, time, relay, bytes, ok, message, "
                "environment, duration, received_at, boot_key_sha256) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        e.node,
                        e.boot_id[:MAX_STORED_TEXT],
                        e.stage[:MAX_STORED_TEXT],
                        e.time,
                        e.relay[:MAX_STORED_TEXT],
                        e.bytes,
                        int(e.ok),
                        e.message[:MAX_STORED_TEXT],
                        e.environment[:MAX_STORED_TEXT],
                        e.duration,
                        received,
                        e.boot_key_sha256 if BOOT_KEY_SHA256_RE.fullmatch(e.boot_key_sha256) else "",
                    )
                    for e in events
                ],
            )
        return len(events)

    def boot_events(self, node: str | None = None, limit: int = 100) -> list[BootEvent]:
        """The newest ``limit`` events (of one node, or all), newest first."""
        if node:
            return self._events("WHERE node = ? ORDER BY id DESC LIMIT ?", (node, limit))
        return self._events("ORDER BY id DESC LIMIT ?", (limit,))

    def boot(self, boot_id: str) -> list[BootEvent]:
        """Every event of one boot, oldest first (by the time each stage ended)."""
        return self._events("WHERE boot_id = ? ORDER BY time, id", (boot_id,))

    def boot_key_sha256(self, boot_id: str, node: str) -> str:
        """The SHA-256 of the boot key ``node``'s agent registered for boot ``boot_id`` ("" if none;
        the first registered: a later event cannot replace it)."""
        with self._lock:
            row = self._db.execute(
                "SELECT boot_key_sha256 FROM boot_events WHERE boot_id = ? AND node = ? "
                "AND boot_key_sha256 != '' ORDER BY id LIMIT 1",
                (boot_id, node),
            ).fetchone()
        return "" if row is None else str(row[0])

    def newest_keyed_boot(self, node: str) -> str:
        """The boot id of ``node``'s newest boot that registered a boot key ("" if none): only
        the node's own agent registers one (relays' observations carry none)."""
        with self._lock:
            row = self._db.execute(
                "SELECT boot_id FROM boot_events WHERE node = ? AND boot_key_sha256 != '' "
                "ORDER BY id DESC LIMIT 1",
                (node,),
            ).fetchone()
        return "" if row is None else str(row[0])

    def node_of_boot(self, boot_id: str) -> str | None:
        """The node a boot id belongs to (from its first event), if any."""
        with self._lock:
            row = self._db.execute(
                "SELECT node FROM boot_events WHERE boot_id = ? ORDER BY id LIMIT 1", (boot_id,)
            ).fetchone()
        return None if row is None else str(row[0])

    def latest_boots(self, node: str | None = None) -> dict[str, list[BootEvent]]:
        """Each node's (or one node's) most recent boot: every event of the boot id of its
        newest event, oldest first."""
        latest = "SELECT node, boot_id FROM boot_events WHERE id IN (SELECT MAX(id) FROM boot_events"
        if node:
            events = self._events(f"WHERE (node, boot_id) IN ({latest} WHERE node = ?)) ORDER BY id", (node,))
        else:
            events = self._events(f"WHERE (node, boot_id) IN ({latest} GROUP BY node)) ORDER BY id", ())
        out: dict[str, list[BootEvent]] = {}
        for e in events:
            out.setdefault(e.node, []).append(e)
        return out

    def last_events(self) -> dict[str, BootEvent]:
        """Each node's most recent event."""
        events = self._events("WHERE id IN (SELECT MAX(id) FROM boot_events GROUP BY node)", ())
        return {e.node: e for e in events}

    def _events(self, where: str, args: tuple[object, ...]) -> list[BootEvent]:
        with self._lock:
            # ``where`` is always one of the literals above; values go in as parameters
            query = f"SELECT {EVENT_COLUMNS} FROM boot_events {where}"  # noqa: S608
            rows = self._db.execute(query, args).fetchall()
        return [
            BootEvent(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]), r[7], r[8], r[9], r[10]) for r in rows
        ]

    def prune_boot_events(self, before: float, dry_run: bool = False) -> int:
        """Delete the events received before ``before`` (seconds since the epoch), except
        those of each node's newest boot and of the boot of its newest ``plan`` (what
        :func:`booted_releases` reads: the release the node runs); how many went
        (``dry_run``: would go).  In batches, each its own short transaction, so that the
        core's writes are never held up for long."""
        keep = (
            "(node, boot_id) NOT IN (SELECT node, boot_id FROM boot_events WHERE id IN "
            "(SELECT MAX(id) FROM boot_events GROUP BY node) OR id IN "
            "(SELECT MAX(id) FROM boot_events WHERE stage = 'plan' GROUP BY node))"
        )
        if dry_run:
            with self._lock:
                query = f"SELECT COUNT(*) FROM boot_events WHERE received_at < ? AND {keep}"  # noqa: S608
                return int(self._db.execute(query, (before,)).fetchone()[0])
        gone = 0
        while True:
            with self._tx() as db:
                batch = db.execute(
                    f"DELETE FROM boot_events WHERE id IN (SELECT id FROM boot_events "  # noqa: S608
                    f"WHERE received_at < ? AND {keep} LIMIT ?)",
                    (before, PRUNE_BATCH),
                ).rowcount
            gone += batch
            if batch < PRUNE_BATCH:
                return gone

    # -- relay heartbeats ----------------------------------------------------
    def record_heartbeat(self, beat: RelayBeat) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO relay_heartbeats (relay, load, active_transfers, egress_bps, "
                "cache_bytes, healthy, message, last_seen) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (relay) DO UPDATE SET load = excluded.load, "
                "active_transfers = excluded.active_transfers, egress_bps = excluded.egress_bps, "
                "cache_bytes = excluded.cache_bytes, healthy = excluded.healthy, "
                "message = excluded.message, last_seen = excluded.last_seen",
                (
                    beat.relay,
                    beat.load,
                    beat.active_transfers,
                    beat.egress_bps,
                    beat.cache_bytes,
                    int(beat.healthy),
                    beat.message[:MAX_STORED_TEXT],
                    beat.last_seen,
                ),
            )

    def heartbeats(self) -> dict[str, RelayBeat]:
        with self._lock:
            rows = self._db.execute(
                "SELECT relay, load, active_transfers, egress_bps, cache_bytes, healthy, message, "
                "last_seen FROM relay_heartbeats"
            ).fetchall()
        return {r[0]: RelayBeat(r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6], r[7]) for r in rows}


def booted_releases(path: str | Path) -> dict[str, str]:
    """Each node's release of record: the digest its newest ``plan`` event names (the
    release its last boot uses, or the one before if that boot has not fetched its plan
    yet).  Reads ``path`` read-only, beside a running core (WAL allows a reader); a
    missing file is :class:`FailedPrecondition` (a wrong path must not look like "no
    node booted anything")."""
    if not Path(path).is_file():
        raise FailedPrecondition(f"state database {path} does not exist (give the core's --state)")
    uri = f"file:{urllib.parse.quote(str(Path(path).absolute()))}?mode=ro"
    try:
        db = sqlite3.connect(uri, uri=True)
    except sqlite3.Error as exc:
        raise FailedPrecondition(f"cannot open state database {path}: {exc}") from None
    try:
        db.execute("PRAGMA busy_timeout = 5000")
        rows = db.execute(
            "SELECT node, message FROM boot_events WHERE id IN "
            "(SELECT MAX(id) FROM boot_events WHERE stage = 'plan' GROUP BY node)"
        ).fetchall()
    except sqlite3.DatabaseError as exc:
        raise FailedPrecondition(f"{path} is not a readable SLIM state database: {exc}") from None
    finally:
        db.close()
    out: dict[str, str] = {}
    for node, message in rows:
        found = _RELEASE_IN_MESSAGE.search(message)
        if found:
            out[node] = found.group(0)
    return out
