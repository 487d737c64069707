"""slim.core.control.state: the SQLite runtime state, on real files."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

import pytest

import slim.core.control.state as state_module
from slim.core.control.service import ORPHAN_SECONDS, CoreService, boot_status
from slim.core.control.state import SCHEMA_VERSION, BootEvent, NextBoot, RelayBeat, State
from slim.core.registry import Registry
from slim.core.store import Store
from slim.errors import FailedPrecondition, InvalidArgument
from slim.vocabulary import MAX_STORED_TEXT as MAX_TEXT

TABLES = {"next_boot", "boot_events", "relay_heartbeats", "tokens", "harvest"}


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


@pytest.fixture
def db(db_path: Path) -> Iterator[State]:
    st = State(db_path)
    yield st
    st.close()


def raw(path: Path) -> closing[sqlite3.Connection]:
    """A second, independent connection to the database file."""
    return closing(sqlite3.connect(path, isolation_level=None))


def tables(path: Path) -> set[str]:
    with raw(path) as conn:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {r[0] for r in rows} - {"sqlite_sequence"}


def user_version(path: Path) -> int:
    with raw(path) as conn:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])


def event(node: str, stage: str, t: float) -> BootEvent:
    return BootEvent(node=node, boot_id=f"{node}-boot", stage=stage, time=t)


# -- opening and migrating ---------------------------------------------------------


def test_new_database_is_wal_at_current_schema(db: State, db_path: Path) -> None:
    assert db.schema_version == SCHEMA_VERSION
    with raw(db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert user_version(db_path) == SCHEMA_VERSION
    assert tables(db_path) == TABLES


def test_empty_database_at_version_0_is_migrated(db_path: Path) -> None:
    with raw(db_path) as conn:  # a real SQLite file with no tables at all
        conn.execute("CREATE TABLE scratch (x)")
        conn.execute("DROP TABLE scratch")
    assert user_version(db_path) == 0
    assert tables(db_path) == set()
    st = State(db_path)
    try:
        assert st.schema_version == SCHEMA_VERSION
    finally:
        st.close()
    assert tables(db_path) == TABLES


def _fill(st: State) -> None:
    st.set_next_boot("n1", "jdk14", "alice", now=100.0)
    st.add_boot_events([event("n1", "kernel", 1.0), event("n2", "initrd", 2.0)], now=3.0)
    st.record_heartbeat(RelayBeat("r1", 0.5, 2, 1e6, 1 << 30, True, "fine", 4.0))


def test_existing_database_is_upgraded_and_keeps_its_rows(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = state_module.MIGRATIONS
    # a database written by the first SLIM (schema 1: no stage durations)
    monkeypatch.setattr(state_module, "MIGRATIONS", real[:1])
    monkeypatch.setattr(state_module, "SCHEMA_VERSION", 1)  # computed once at import
    with raw(db_path) as conn:
        for statement in real[0].split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute(
            "INSERT INTO boot_events (node, boot_id, stage, time, relay, bytes, ok, message, environment, "
            "received_at) VALUES ('n1', 'b1', 'kernel', 1.0, 'r1', 5, 1, '', 'base', 3.0)"
        )
        conn.execute("PRAGMA user_version = 1")
    # this SLIM's migrations, and one more a later SLIM might add
    migrations = (
        *real,
        "ALTER TABLE next_boot ADD COLUMN note TEXT NOT NULL DEFAULT 'kept';"
        "CREATE INDEX next_boot_env ON next_boot (environment)",
    )
    monkeypatch.setattr(state_module, "MIGRATIONS", migrations)
    monkeypatch.setattr(state_module, "SCHEMA_VERSION", len(migrations))
    st = State(db_path)
    try:
        assert st.schema_version == len(migrations)
        (old,) = st.boot_events()
        assert (old.stage, old.bytes, old.duration, old.received_at) == ("kernel", 5, 0.0, 3.0)
        _fill(st)
        assert st.next_boots() == {"n1": NextBoot("n1", "jdk14", "alice", 100.0)}
        assert [e.stage for e in st.boot_events()] == ["initrd", "kernel", "kernel"]
        assert set(st.heartbeats()) == {"r1"}
        assert st.node_of_boot("b1") == "n1"
    finally:
        st.close()
    assert user_version(db_path) == len(migrations)
    with raw(db_path) as conn:
        assert conn.execute("SELECT note FROM next_boot").fetchall() == [("kept",)]


def test_a_failing_migration_changes_nothing(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    State(db_path).close()
    migrations = (
        *state_module.MIGRATIONS,
        "ALTER TABLE next_boot ADD COLUMN note TEXT; ALTER TABLE no_such_table ADD COLUMN x TEXT",
    )
    monkeypatch.setattr(state_module, "MIGRATIONS", migrations)
    monkeypatch.setattr(state_module, "SCHEMA_VERSION", len(migrations))
    with pytest.raises(FailedPrecondition, match="not a usable SLIM state database"):
        State(db_path)
    assert user_version(db_path) == len(migrations) - 1
    with raw(db_path) as conn:
        columns = {r[1] for r in conn.execute("PRAGMA table_info(next_boot)")}
    assert "note" not in columns


def test_newer_schema_is_refused(db_path: Path) -> None:
    State(db_path).close()
    with raw(db_path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    with pytest.raises(FailedPrecondition) as info:
        State(db_path)
    message = str(info.value)
    assert str(db_path) in message
    assert f"schema version {SCHEMA_VERSION + 5}" in message
    assert f"({SCHEMA_VERSION})" in message
    assert user_version(db_path) == SCHEMA_VERSION + 5  # left alone


def test_a_file_that_is_not_sqlite_is_refused(db_path: Path) -> None:
    garbage = b"this is not a database\x00\xff" * 200
    db_path.write_bytes(garbage)
    with pytest.raises(FailedPrecondition) as info:
        State(db_path)
    assert str(db_path) in str(info.value)
    assert db_path.read_bytes() == garbage


# -- next-boot overrides -------------------------------------------------------------


def test_next_boot_set_overwrite_clear(db: State) -> None:
    assert db.next_boots() == {}
    first = db.set_next_boot("n1", "jdk14", "alice", now=10.0)
    assert first == NextBoot("n1", "jdk14", "alice", 10.0)
    assert db.next_boots() == {"n1": first}

    second = db.set_next_boot("n1", "base", "bob", now=20.0)
    assert db.next_boots() == {"n1": second} == {"n1": NextBoot("n1", "base", "bob", 20.0)}

    db.set_next_boot("n2", "base", "", now=30.0)
    assert db.next_boots()["n2"].set_by == "unknown"

    assert db.clear_next_boot("n1") is True
    assert db.clear_next_boot("n1") is False
    assert set(db.next_boots()) == {"n2"}


def test_next_boot_set_by_is_truncated_consistently(db: State) -> None:
    returned = db.set_next_boot("n1", "base", "x" * (MAX_TEXT + 10), now=1.0)
    assert len(returned.set_by) == MAX_TEXT
    assert db.next_boots()["n1"] == returned


def test_next_boot_survives_reopen(db_path: Path) -> None:
    st = State(db_path)
    st.set_next_boot("n1", "jdk14", "alice", now=10.0)
    st.set_next_boot("n2", "base", "bob", now=11.0)
    st.clear_next_boot("n2")
    st.close()
    st = State(db_path)
    try:
        assert st.next_boots() == {"n1": NextBoot("n1", "jdk14", "alice", 10.0)}
    finally:
        st.close()


# -- boot events ---------------------------------------------------------------------


def test_boot_events_newest_first_with_limit_and_filter(db: State) -> None:
    assert db.add_boot_events([event("n1", "dhcp", 1.0), event("n2", "dhcp", 2.0)], now=5.0) == 2
    assert db.add_boot_events([event("n1", "kernel", 3.0)], now=6.0) == 1
    db.add_boot_events([event("n2", "kernel", 4.0), event("n1", "running", 5.0)], now=7.0)

    assert [(e.node, e.stage) for e in db.boot_events()] == [
        ("n1", "running"),
        ("n2", "kernel"),
        ("n1", "kernel"),
        ("n2", "dhcp"),
        ("n1", "dhcp"),
    ]
    assert [(e.node, e.stage) for e in db.boot_events(limit=2)] == [("n1", "running"), ("n2", "kernel")]
    assert [e.stage for e in db.boot_events("n1")] == ["running", "kernel", "dhcp"]
    assert [e.stage for e in db.boot_events("n2", limit=1)] == ["kernel"]
    assert db.boot_events("n9") == []

    last = db.last_events()
    assert set(last) == {"n1", "n2"}
    assert last["n1"].stage == "running"
    assert last["n2"].stage == "kernel"


def test_boot_event_fields_round_trip(db: State) -> None:
    e = BootEvent("n1", "b-1", "fetch", 12.5, "relay-a", 2**63 - 1, False, "timeout", "jdk14", 2.25)
    db.add_boot_events([e])
    assert db.boot_events() == [e]
    assert db.last_events() == {"n1": e}
    assert db.boot_events()[0].ok is False


def test_invalid_event_writes_nothing(db: State) -> None:
    good = event("n1", "dhcp", 1.0)
    with pytest.raises(InvalidArgument, match="node and a stage"):
        db.add_boot_events([good, event("", "dhcp", 2.0)])
    with pytest.raises(InvalidArgument):
        db.add_boot_events([good, event("n1", "", 2.0)])
    assert db.boot_events() == []
    assert db.last_events() == {}


def test_long_texts_are_truncated(db: State) -> None:
    long = "m" * (MAX_TEXT * 3)
    db.add_boot_events([BootEvent("n1", long, long, 1.0, long, 0, True, long, long)])
    (stored,) = db.boot_events()
    for text in (stored.boot_id, stored.stage, stored.relay, stored.message, stored.environment):
        assert text == "m" * MAX_TEXT


def test_events_survive_reopen(db_path: Path) -> None:
    st = State(db_path)
    st.add_boot_events([event("n1", "dhcp", 1.0), event("n1", "kernel", 2.0)])
    st.close()
    st = State(db_path)
    try:
        assert [e.stage for e in st.boot_events("n1")] == ["kernel", "dhcp"]
    finally:
        st.close()


# -- transactions ----------------------------------------------------------------------


def test_statement_that_rolls_back_leaves_state_usable(db: State, db_path: Path) -> None:
    """SQLite itself rolls the transaction back; the original error must surface."""
    with raw(db_path) as conn:
        conn.execute(
            "CREATE TRIGGER poison BEFORE INSERT ON boot_events WHEN NEW.stage = 'poison' "
            "BEGIN SELECT RAISE(ROLLBACK, 'poisoned event'); END"
        )
    with pytest.raises(sqlite3.IntegrityError, match="poisoned event"):
        db.add_boot_events([event("n1", "dhcp", 1.0), event("n1", "poison", 2.0)])
    assert db.boot_events() == []
    db.add_boot_events([event("n1", "dhcp", 3.0)])
    assert len(db.boot_events()) == 1


def test_failed_commit_is_rolled_back(db: State, db_path: Path) -> None:
    """A deferred constraint fails at COMMIT; the connection must not stay in a transaction."""
    with raw(db_path) as conn:
        conn.executescript(
            """
            CREATE TABLE parent (id INTEGER PRIMARY KEY);
            CREATE TABLE audit (parent INTEGER REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED);
            CREATE TRIGGER orphan AFTER INSERT ON boot_events WHEN NEW.stage = 'orphan'
            BEGIN INSERT INTO audit VALUES (42); END;
            """
        )
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
        db.add_boot_events([event("n1", "orphan", 1.0)])
    assert db.boot_events() == []
    db.add_boot_events([event("n1", "dhcp", 2.0)])  # not "cannot start a transaction within a transaction"
    assert [e.stage for e in db.boot_events()] == ["dhcp"]


# -- relay heartbeats ------------------------------------------------------------------


def test_heartbeat_record_upsert_and_reopen(db_path: Path) -> None:
    st = State(db_path)
    first = RelayBeat("r1", 0.25, 3, 1.5e8, 2**40, True, "ok", 100.0)
    other = RelayBeat("r2", 0.0, 0, 0.0, 0, False, "disk full", 101.0)
    st.record_heartbeat(first)
    st.record_heartbeat(other)
    assert st.heartbeats() == {"r1": first, "r2": other}

    updated = RelayBeat("r1", 0.9, 17, 9.5e8, 2**63 - 1, False, "m" * (MAX_TEXT + 1), 200.0)
    st.record_heartbeat(updated)
    got = st.heartbeats()["r1"]
    assert got == RelayBeat("r1", 0.9, 17, 9.5e8, 2**63 - 1, False, "m" * MAX_TEXT, 200.0)
    assert got.healthy is False
    st.close()

    st = State(db_path)
    try:
        assert st.heartbeats() == {"r1": got, "r2": other}
    finally:
        st.close()


# -- concurrency -------------------------------------------------------------------------


@pytest.mark.parametrize("shared", [True, False], ids=["one-connection", "two-connections"])
def test_concurrent_writers_lose_nothing(db_path: Path, shared: bool) -> None:
    per_thread = 200
    states = [State(db_path)]
    states.append(states[0] if shared else State(db_path))
    start = threading.Barrier(2)

    def write(st: State, node: str) -> None:
        start.wait(timeout=30)
        for i in range(per_thread):
            st.add_boot_events([event(node, f"stage-{i}", float(i))])

    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            futures = [pool.submit(write, st, f"n{k}") for k, st in enumerate(states)]
            for f in futures:
                f.result(timeout=120)  # re-raises a writer's exception
        events = states[0].boot_events(limit=10 * per_thread)
        assert len(events) == 2 * per_thread
        for node in ("n0", "n1"):
            mine = states[0].boot_events(node, limit=10 * per_thread)
            assert [e.stage for e in reversed(mine)] == [f"stage-{i}" for i in range(per_thread)]
    finally:
        for st in {id(s): s for s in states}.values():
            st.close()


def test_latest_boots_and_their_status(db: State) -> None:
    def ev(node: str, boot: str, stage: str, t: float, ok: bool = True, env: str = "base") -> BootEvent:
        return BootEvent(node, boot, stage, t, ok=ok, message="" if ok else "disk full", environment=env)

    db.add_boot_events([ev("n1", "a", "plan", 1), ev("n1", "a", "done", 2), ev("n2", "x", "plan", 1)], now=5)
    db.add_boot_events([ev("n1", "b", "plan", 3, env="jdk14"), ev("n1", "b", "ram:/", 4, env="jdk14")], now=6)
    boots = db.latest_boots()
    assert [e.stage for e in boots["n1"]] == ["plan", "ram:/"]  # boot b, oldest first
    assert db.latest_boots("n2") == {"n2": boots["n2"]} and db.latest_boots("n9") == {}
    booting = boot_status(boots["n1"])
    assert booting is not None and (booting.environment, booting.state, booting.stage) == (
        "jdk14",
        "booting",
        "ram:/",
    )
    db.add_boot_events([ev("n1", "b", "disk:/var", 5, ok=False, env="jdk14")], now=7)
    failed = boot_status(db.latest_boots("n1")["n1"])
    assert failed is not None and (failed.state, failed.stage, failed.message) == (
        "failed",
        "disk:/var",
        "disk full",
    )
    # the agent done is not up: only the running environment says so
    n2 = db.latest_boots("n2")["n2"] + [ev("n2", "x", "done", 2)]
    done = boot_status(n2)
    assert done is not None and done.state == "booting" and done.environment == "base"
    db.add_boot_events([ev("n2", "x", "done", 2), ev("n2", "x", "switch_root", 3)], now=10)
    n2 = db.latest_boots("n2")["n2"]
    starting = boot_status(n2, now=39.0, up_timeout=30)
    assert starting is not None and (starting.state, starting.since) == ("starting", 10.0)
    late = boot_status(n2, now=41.0, up_timeout=30)
    assert late is not None and (late.state, late.stage, late.message, late.since) == (
        "failed", "up", "no report from the environment 30 s after switch_root", 40.0
    )  # fmt: skip
    db.add_boot_events([ev("n2", "x", "up", 4)], now=20)
    up = boot_status(db.latest_boots("n2")["n2"], now=1000.0, up_timeout=30)
    assert up is not None and (up.state, up.since, up.environment) == ("up", 20.0, "base")
    assert boot_status([]) is None


def test_events_of_an_unknown_boot_wait_for_their_node_then_expire(
    registry: Registry, state: State, store: Store
) -> None:
    """A relay's record naming only a boot id waits for the event that names the boot's
    node; one that no such event follows within ORPHAN_SECONDS is dropped."""
    clock = [1000.0]
    service = CoreService(registry, state, store, clock=lambda: clock[0])
    assert service.report_events([BootEvent("", "b-late", "kernel", 1.0, bytes=7)]) == 1
    assert service.report_events([BootEvent("", "b-never", "initrd", 1.0)]) == 1
    assert state.boot("b-late") == [] and state.boot("b-never") == []
    clock[0] += ORPHAN_SECONDS / 2
    service.report_events([BootEvent("n1", "b-late", "script", 0.5)])
    assert [(e.node, e.stage, e.bytes) for e in state.boot("b-late")] == [
        ("n1", "script", 0),
        ("n1", "kernel", 7),
    ]
    clock[0] += ORPHAN_SECONDS
    service.report_events([BootEvent("n1", "b-never", "script", 0.5)])  # too late: it was dropped
    assert [e.stage for e in state.boot("b-never")] == ["script"]


def test_a_relays_failed_attempt_does_not_fail_the_boot() -> None:
    """A relay that answered the loader 503 (or whose download broke off) records a failed
    attempt; the loader tries again, so only the agent's stages and the report decide."""
    busy = BootEvent("n1", "b", "kernel", 1.0, ok=False, message="answered 503")
    events = [
        BootEvent("n1", "b", "tftp:ipxe.efi", 0.5, ok=False, message="timed out"),
        BootEvent("n1", "b", "script", 0.9),
        busy,
        BootEvent("n1", "b", "kernel", 2.0, bytes=9),
        BootEvent("n1", "b", "plan", 3.0, environment="base"),
    ]
    status = boot_status(events)
    assert status is not None and status.state == "booting", status
    agent_failed = boot_status([*events, BootEvent("n1", "b", "ram:/", 4.0, ok=False, message="disk full")])
    assert agent_failed is not None and (agent_failed.state, agent_failed.stage) == ("failed", "ram:/")
