"""The core's /metrics (Prometheus text) on its object server: gRPC calls by method and status,
their latency, nodes by the state of their latest boot, relays by health — from a real
`slim core serve` process on 127.0.0.1, port 0, after real calls."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from slim import rpc
from slim.cli import main
from slim.core.store import Store
from slim.v1 import core_pb2 as pb
from slim.v1 import core_pb2_grpc as pb_grpc
from tests.support import https_get, read_address, relay_credentials, start_core, stop


def slim(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_core_metrics_after_calls(registry_file: Path, tmp_path: Path, store: Store) -> None:
    proc = start_core(registry_file, tmp_path, "--objects-listen", "127.0.0.1:0")
    try:
        address = read_address(proc)
        assert proc.stdout is not None
        port = int(proc.stdout.readline().rsplit(":", 1)[1])
        for _ in range(2):
            assert slim("node", "list", "--core", address)[0] == 0
        code, out = slim("node", "show", "nosuch", "--core", address)
        assert code == 1 and "nosuch" in out

        def events() -> Iterator[pb.BootEvent]:
            for stage in ("plan", "done", "switch_root", "up"):
                yield pb.BootEvent(
                    node="n1", boot_id="b1", stage=stage, ok=True, environment="base", origin="10.1.0.9"
                )

        with rpc.channel(address, relay_credentials("room-1")) as channel:
            assert pb_grpc.CoreStub(channel).ReportBootEvents(events(), timeout=10).accepted == 4
            # one relay's heartbeat stream: one beat, its reply, then the relay goes
            beats = pb_grpc.CoreStub(channel).RelayHeartbeat(
                iter([pb.Heartbeat(relay="room-1", load=1, healthy=True)]), timeout=10
            )
            assert next(beats).interval_ms > 0
            beats.cancel()

        def ended(got: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> float:
            return sum(
                got.get(("slim_core_grpc_calls_total", (("code", code), ("method", "RelayHeartbeat"))), 0.0)
                for code in ("OK", "CANCELLED")
            )

        for _ in range(100):  # bounded: the core sees the cancelled stream end on its own time
            status, headers, body = https_get(port, "/metrics")  # the object server: HTTPS
            assert status == 200 and headers["Content-Type"].startswith("text/plain")
            got = samples(body.decode())
            if ended(got):
                break
            time.sleep(0.1)
    finally:
        code, err = stop(proc)
    assert code == 0, err

    def value(name: str, **labels: str) -> float:
        return got[(name, tuple(sorted(labels.items())))]

    assert value("slim_core_grpc_calls_total", method="ListNodes", code="OK") == 2
    assert value("slim_core_grpc_calls_total", method="GetNode", code="NOT_FOUND") == 1
    assert value("slim_core_grpc_calls_total", method="ReportBootEvents", code="OK") == 1
    assert value("slim_core_grpc_call_seconds_count", method="ListNodes") == 2
    assert value("slim_core_grpc_call_seconds_bucket", method="ListNodes", le="+Inf") == 2
    assert value("slim_core_grpc_call_seconds_sum", method="GetNode") > 0
    # n1 booted and its environment reported up; n2 and n3 never booted; room-1 beat once
    assert value("slim_core_nodes", state="up") == 1
    assert value("slim_core_nodes", state="never") == 2
    assert value("slim_core_nodes", state="failed") == 0
    assert value("slim_core_relays", status="unknown") == 3
    assert value("slim_core_relays", status="live") == 1
    # the stream, counted once when it ended (the relay left: cancelled, or its beats ran out)
    assert ended(got) == 1
    assert ("slim_origin_object_requests_total", ()) in got  # the object server's own, beside them
