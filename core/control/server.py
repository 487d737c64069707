"""The gRPC core: thin servicers over :class:`slim.core.control.service.CoreService`.

Each method parses its request, calls one domain method and maps the answer.
Errors: a :class:`slim.errors.SlimError` becomes its own status code with its
message (logged without a traceback); anything else is logged with a
traceback and answered INTERNAL.  Writes to SQLite run on one dedicated
thread so the event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import signal
import time
from collections import Counter as Tally
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import grpc
import uvloop
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from slim.core.control import service as dom
from slim.core.control.auth import Authenticator, Kind, TokenRecord
from slim.core.control.config import CoreConfig
from slim.core.control.harvest import POLL_MS, STATES, Harvest, PoolView, Result
from slim.core.control.redirect import RankedRelay, RelayStatus
from slim.core.control.relayhub import RelayHub
from slim.core.control.state import BootEvent, State
from slim.core.registry import load_registry
from slim.core.store import Store
from slim.errors import FailedPrecondition, InvalidArgument, PermissionDenied, SlimError, Unavailable
from slim.objects.server import ObjectServer, server_context
from slim.pki import REFRESH_SECONDS, CertificateAuthority, Revocations
from slim.release import ObjectRef
from slim.rpc import MAX_MESSAGE_BYTES, POLICY_TO_PB, TIER_TO_PB, error_metadata, status_code
from slim.signing import ReloadingSigner
from slim.v1 import core_pb2 as pb
from slim.v1 import core_pb2_grpc as pb_grpc
from slim.vocabulary import MAX_STAGE_SECONDS, MAX_STORED_TEXT, MAX_TIMESTAMP_SECONDS, Policy

log = logging.getLogger(__name__)
HARVEST_TICK = 1.0  # seconds between looks at the pools' windows

P = ParamSpec("P")
T = TypeVar("T")
MAX_EVENTS_PER_STREAM = 10_000
_CACHE_SIZE = 4096  # entries in the message cache below; cleared when full

FORMATS = {
    pb.SCRIPT_FORMAT_UNSPECIFIED: "ipxe",
    pb.SCRIPT_FORMAT_IPXE: "ipxe",
    pb.SCRIPT_FORMAT_PXELINUX: "pxelinux",
}


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException, method: str) -> None:
    if isinstance(exc, SlimError):
        log.info("%s: %s: %s", method, exc.grpc_code, exc.message)
        await context.abort(status_code(exc), exc.message, trailing_metadata=error_metadata(exc))
    log.exception("%s: unexpected error", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method} (see the core's log)")


def unary(
    fn: Callable[[Any, Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[T]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[T]]:
    """Map errors of a unary-response method to gRPC statuses."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> T:
        try:
            return await fn(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await _abort(context, exc, fn.__name__)
            raise AssertionError("abort returned") from exc

    return wrapper


# protobuf Timestamps span 0001-01-01 to 9999-12-31; boot events must lie after 1970


def _ts(seconds: float) -> Timestamp:
    ts = Timestamp()
    clamped = min(max(seconds, 0.0), float(MAX_TIMESTAMP_SECONDS))  # never fail a read
    ts.FromNanoseconds(int(clamped * 1e9))
    return ts


def _seconds(ts: Timestamp, what: str) -> float:
    if not (0 <= ts.seconds <= MAX_TIMESTAMP_SECONDS and 0 <= ts.nanos < 1_000_000_000):
        raise InvalidArgument(f"{what}: time {ts.seconds}.{ts.nanos:09d} is not between 1970 and 9999")
    return ts.seconds + ts.nanos / 1e9


def _duration(value: float, index: int) -> float:
    if not 0 <= value <= MAX_STAGE_SECONDS:  # NaN fails too
        raise InvalidArgument(f"event {index}: duration {value} is not between 0 and {MAX_STAGE_SECONDS:g} s")
    return value


def _node_ref(ref: pb.NodeRef) -> dom.NodeRef:
    which = ref.WhichOneof("ref")
    if which == "name":
        return dom.NodeRef(name=ref.name)
    if which == "mac":
        return dom.NodeRef(mac=ref.mac)
    raise InvalidArgument("node is required (by name or by mac)")


def _obj(ref: ObjectRef | None) -> pb.ObjectRef | None:
    return pb.ObjectRef(digest=ref.digest, size=ref.size) if ref else None


def relay_pb(r: RankedRelay) -> pb.RankedRelay:
    return pb.RankedRelay(
        name=r.name,
        urls=r.urls,
        site=r.site,
        tier=TIER_TO_PB[r.tier],
        score=r.score,
        heartbeat_seen=r.heartbeat_seen,
    )


_DIRS_PB: dict[tuple[dom.DirectoryAction, ...], list[pb.DirectoryAction]] = {}


def plan_pb(plan: dom.BootPlan) -> pb.BootPlan:
    # Plans of one environment share their directory actions (the same objects,
    # compared by identity), so their messages are made once.
    dirs = _DIRS_PB.get(plan.directories)
    if dirs is None:
        dirs = directories_pb(plan.directories)
        if len(_DIRS_PB) >= _CACHE_SIZE:
            _DIRS_PB.clear()
        _DIRS_PB[plan.directories] = dirs
    return pb.BootPlan(
        node=plan.node,
        environment=plan.environment,
        release_digest=plan.release_digest,
        kernel=_obj(plan.kernel),
        initrd=_obj(plan.initrd),
        kernel_args=plan.kernel_args,
        modules=plan.modules,
        disk=plan.disk,
        directories=dirs,
        relays=[relay_pb(r) for r in plan.relays],
        reason=plan.reason,
        site=plan.site or "",
    )


def directories_pb(actions: tuple[dom.DirectoryAction, ...]) -> list[pb.DirectoryAction]:
    dirs = []
    for d in actions:
        nfs = (
            pb.NfsMount(
                server=d.nfs.server,
                export=d.nfs.export,
                options=d.nfs.options,
                servers=list(d.nfs.servers),
            )
            if d.nfs
            else None
        )
        dirs.append(
            pb.DirectoryAction(
                path=d.path,
                policy=POLICY_TO_PB[d.policy],
                archive=_obj(d.archive),
                manifest=_obj(d.manifest),
                nfs=nfs,
                tmpfs_size=d.tmpfs_size,
                bytes=d.bytes,
                files=d.files,
            )
        )
    return dirs


def event_pb(e: BootEvent) -> pb.BootEvent:
    return pb.BootEvent(
        node=e.node,
        boot_id=e.boot_id,
        stage=e.stage,
        time=_ts(e.time),
        relay=e.relay,
        bytes=e.bytes,
        ok=e.ok,
        message=e.message,
        environment=e.environment,
        duration=e.duration,
    )


def node_pb(v: dom.NodeView) -> pb.NodeInfo:
    info = pb.NodeInfo(
        name=v.name,
        macs=v.node.macs,
        profile=v.node.profile,
        default_environment=v.node.environment,
        site=v.node.site or "",
        disk=v.node.disk or "",
        groups=v.node.groups,
        next_environment=v.next_environment,
    )
    if v.next_boot is not None:
        info.next_boot.CopyFrom(
            pb.NextBoot(
                environment=v.next_boot.environment, set_by=v.next_boot.set_by, set_at=_ts(v.next_boot.set_at)
            )
        )
    if v.last_event is not None:
        info.last_event.CopyFrom(event_pb(v.last_event))
    if v.boot is not None:
        b = v.boot
        info.boot.CopyFrom(
            pb.BootStatus(
                boot_id=b.boot_id, environment=b.environment, state=b.state, stage=b.stage,
                message=b.message, time=_ts(b.time), since=_ts(b.since),
            )
        )  # fmt: skip
    return info


def environment_pb(v: dom.EnvironmentView) -> pb.EnvironmentInfo:
    return pb.EnvironmentInfo(
        name=v.name,
        feature=v.feature,
        image=v.env.image,
        kernel=v.env.kernel,
        kernel_args=v.env.kernel_args,
        description=v.env.description,
        directories=[
            pb.DirectoryInfo(
                path=path,
                policy=POLICY_TO_PB[spec.policy],
                options=spec.nfs_options if spec.policy is Policy.NFS else "",
            )
            for path, spec in v.directories.items()
        ],
        release_digest=v.release_digest or "",
    )


def relay_info_pb(v: dom.RelayView) -> pb.RelayInfo:
    info = pb.RelayInfo(
        name=v.name,
        urls=v.relay.urls,
        site=v.relay.site,
        parent=v.relay.parent or "",
        capacity=v.relay.capacity,
        status=str(v.status),
        nfs=v.relay.nfs or "",
    )
    if v.beat is not None:
        b = v.beat
        info.last_heartbeat.CopyFrom(
            pb.Heartbeat(
                relay=b.relay,
                load=b.load,
                active_transfers=b.active_transfers,
                egress_bytes_per_second=b.egress_bps,
                cache_bytes=b.cache_bytes,
                healthy=b.healthy,
                message=b.message,
                nfs_trees=sorted(v.nfs_trees),
            )
        )
        info.last_seen.CopyFrom(_ts(b.last_seen))
    return info


_KINDS: dict[pb.TokenKind.ValueType, Kind] = {
    pb.TOKEN_KIND_ADMIN: "admin",
    pb.TOKEN_KIND_NODE: "node",
    pb.TOKEN_KIND_CODE: "code",
}
KIND_TO_PB = {v: k for k, v in _KINDS.items()}


def _token_kind(value: pb.TokenKind.ValueType) -> Kind | None:
    if value and value not in _KINDS:
        raise InvalidArgument(f"unknown token kind {value}")
    return _KINDS.get(value)


def token_pb(r: TokenRecord) -> pb.TokenInfo:
    info = pb.TokenInfo(id=r.id, kind=KIND_TO_PB[r.kind], name=r.name, created=_ts(r.created))
    if r.expires is not None:
        info.expires.CopyFrom(_ts(r.expires))
    if r.revoked_at is not None:
        info.revoked.CopyFrom(_ts(r.revoked_at))
    return info


def _desktops_pb(results: list[Result]) -> pb.DesktopsReply:
    return pb.DesktopsReply(
        results=[pb.DesktopResult(node=r.node, ok=r.ok, message=r.message) for r in results]
    )


def _pool_pb(v: PoolView) -> pb.PoolStatus:
    return pb.PoolStatus(
        name=v.name, partition=v.pool.partition, open=v.open, window_start=_ts(v.window_start),
        window_end=_ts(v.window_end), environment=v.pool.environment,
        desktops=[
            pb.DesktopStatus(
                node=d.node, state=d.state, since=_ts(d.since) if d.since else None, reason=d.reason,
                boot_id=d.boot_id, woken_from_off=d.woken_from_off,
            )
            for d in v.desktops
        ],
        node_hours_ee=v.node_hours_ee, node_hours_jobs=v.node_hours_jobs, jobs_source=v.jobs_source,
        upcoming=[pb.Window(start=_ts(a), end=_ts(b)) for a, b in v.upcoming], grace=v.pool.grace,
        wake_timeout=v.pool.wake_timeout, on_window_end=v.pool.on_window_end,
        wakes_per_minute=v.pool.wakes_per_minute, time_zone=v.pool.time_zone,
    )  # fmt: skip


class _Base:
    def __init__(
        self,
        service: dom.CoreService,
        writer: ThreadPoolExecutor,
        hub: RelayHub,
        auth: Authenticator,
        harvest: Harvest | None = None,
    ) -> None:
        self.harvest = harvest
        self.service = service
        self._writer = writer
        self.hub = hub
        self.auth = auth

    async def write(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a domain method that writes to SQLite on the writer thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._writer, functools.partial(fn, *args, **kwargs))


class CoreServicer(_Base, pb_grpc.CoreServicer):
    @unary
    async def Locate(self, request: pb.LocateRequest, context: Any) -> pb.LocateResponse:
        vouched = await self.auth.node_call(context, request.peek)
        found = self.service.locate(
            _node_ref(request.node), request.origin, request.peek, token=request.node_token or None,
            vouched=vouched,
        )  # fmt: skip
        return pb.LocateResponse(
            node=found.node, site=found.site or "", relays=[relay_pb(r) for r in found.relays]
        )

    @unary
    async def GetBootPlan(self, request: pb.GetBootPlanRequest, context: Any) -> pb.BootPlan:
        vouched = await self.auth.node_call(context, request.peek)
        plan = self.service.boot_plan(
            _node_ref(request.node), request.origin, request.peek, token=request.node_token or None,
            vouched=vouched, environment=request.environment,
        )  # fmt: skip
        answer = plan_pb(plan)
        answer.document, answer.signature = self.service.sign_plan(plan, request.nonce)
        answer.endorsements.extend(
            pb.KeyEndorsement(key=e.key, signature=e.signature) for e in self.service.key_endorsements()
        )
        return answer

    @unary
    async def GetBootScript(self, request: pb.GetBootScriptRequest, context: Any) -> pb.BootScript:
        if request.format not in FORMATS:
            raise InvalidArgument(f"unknown script format {request.format}")
        vouched = await self.auth.node_call(context, request.peek)
        s = self.service.boot_script(
            request.mac,
            request.origin,
            FORMATS[request.format],
            request.peek,
            token=request.node_token or None,
            vouched=vouched,
        )
        return pb.BootScript(
            node=s.node,
            default_environment=s.default_environment,
            content_type=s.content_type,
            script=s.script,
            boot_id=s.boot_id,
        )

    @unary
    async def GetNodeSecrets(self, request: pb.GetNodeSecretsRequest, context: Any) -> pb.NodeSecrets:
        await self.auth.relay(context)  # never to an admin peeking
        files = await asyncio.get_running_loop().run_in_executor(  # reads files: off the loop
            None,
            self.service.node_secrets,
            _node_ref(request.node),
            request.origin,
            request.node_token or None,
            request.environment,
            request.secure,
        )
        return pb.NodeSecrets(
            secrets=[pb.SecretFile(path=f.path, mode=f.mode, owner=f.owner, content=f.content) for f in files]
        )

    @unary
    async def GetNodeOrder(self, request: pb.GetNodeOrderRequest, context: Any) -> pb.NodeOrder:
        await self.auth.relay(context)
        node, boot_id = self.service.node_boot(
            _node_ref(request.node), request.origin, request.node_token or None, request.boot_id,
            request.secure, request.boot_key[:MAX_STORED_TEXT],
        )  # fmt: skip
        action, reason, poll = (
            self.harvest.order_for(node, boot_id) if self.harvest else ("", "", POLL_MS / 1000)
        )
        return pb.NodeOrder(action=action, reason=reason, poll_ms=round(poll * 1000))

    @unary
    async def RedeemCode(self, request: pb.RedeemCodeRequest, context: Any) -> pb.RedeemCodeResponse:
        caller = await self.auth.relay(context)
        node, token = await self.write(self.service.redeem_code, request.code[:MAX_STORED_TEXT])
        log.info("%s redeemed a one-time code for %s (from %s)", caller.principal, node, request.origin[:64])
        return pb.RedeemCodeResponse(node=node, token=token.text)

    @unary
    async def ReportBootEvents(
        self, request_iterator: AsyncIterator[pb.BootEvent], context: Any
    ) -> pb.ReportBootEventsResponse:
        caller = await self.auth.relay(context)
        events: list[BootEvent] = []
        tokens: dict[int, str] = {}  # event index -> the node's token, checked by the service
        origins: dict[int, str] = {}  # ... and where a node's own event came from
        keys: dict[int, str] = {}  # ... or the running environment's boot key
        now = self.service.clock()
        async for e in request_iterator:
            if e.node_token:
                tokens[len(events)] = e.node_token[:MAX_STORED_TEXT]
            if e.origin:
                origins[len(events)] = e.origin[:MAX_STORED_TEXT]
            if e.boot_key:
                keys[len(events)] = e.boot_key[:MAX_STORED_TEXT]
            if len(events) >= MAX_EVENTS_PER_STREAM:
                raise InvalidArgument(f"more than {MAX_EVENTS_PER_STREAM} events in one stream; split it")
            when = _seconds(e.time, f"event {len(events) + 1}") if e.HasField("time") else now
            # text is cut as it arrives, so a stream holds at most MAX_EVENTS_PER_STREAM small events
            events.append(
                BootEvent(
                    e.node[:MAX_STORED_TEXT],
                    e.boot_id[:MAX_STORED_TEXT],
                    e.stage[:MAX_STORED_TEXT],
                    when,
                    caller.relay or e.relay[:MAX_STORED_TEXT],  # a relay is who its certificate says
                    min(e.bytes, 2**63 - 1),
                    e.ok,
                    e.message[:MAX_STORED_TEXT],
                    e.environment[:MAX_STORED_TEXT],
                    _duration(e.duration, len(events) + 1),
                    boot_key_sha256=e.boot_key_sha256[:64],
                )
            )
        accepted = await self.write(
            self.service.report_events, events, tokens, origins, from_relay=caller.role == "relay", keys=keys
        )
        return pb.ReportBootEventsResponse(accepted=accepted)

    async def RelayHeartbeat(
        self, request_iterator: AsyncIterator[pb.Heartbeat], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.HeartbeatReply]:
        # Beats are read by a task; replies, and orders from Admin.Prefetch, come out of one queue.
        queue: asyncio.Queue[pb.HeartbeatReply | None] | None = None
        relay = ""
        opened = asyncio.Event()

        async def read() -> None:
            nonlocal queue, relay
            try:
                caller = await self.auth.relay(context)
                async for beat in request_iterator:
                    if caller.relay:  # the name is the certificate's, whatever the beat says
                        if beat.relay and beat.relay != caller.relay:
                            raise PermissionDenied(
                                f"{caller.principal} cannot heartbeat as relay {beat.relay!r}"
                            )
                        beat.relay = caller.relay
                        await self.auth.caller(context)  # revoked since the stream opened: it ends now
                    if not beat.relay:
                        raise InvalidArgument("a heartbeat must name its relay")
                    if relay and beat.relay != relay:
                        raise InvalidArgument(
                            f"one heartbeat stream carries one relay ({relay!r}), not {beat.relay!r}"
                        )
                    interval = await self.write(
                        self.service.heartbeat,
                        beat.relay,
                        beat.load,
                        beat.active_transfers,
                        beat.egress_bytes_per_second,
                        beat.cache_bytes,
                        beat.healthy,
                        beat.message,
                        list(beat.nfs_trees),
                    )
                    if queue is None:
                        relay = beat.relay
                        queue = self.hub.connect(relay)
                        opened.set()
                        log.info("relay %s: heartbeat stream opened", relay)
                    if beat.prefetch:
                        self.hub.update(relay, beat.prefetch)
                    signatures = self.service.release_signatures()
                    self.hub.reply(
                        relay,
                        pb.HeartbeatReply(
                            interval_ms=max(1, math.ceil(interval * 1000)),
                            pinned_releases=list(signatures),
                            release_signatures={d: s for d, s in signatures.items() if s},
                            nfs_export_root=self.service.registry.settings.nfs_export_root,
                            endorsements=[
                                pb.KeyEndorsement(key=e.key, signature=e.signature)
                                for e in self.service.key_endorsements()
                            ],
                        ),
                    )
            finally:
                opened.set()
                if queue is not None:
                    queue.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            await opened.wait()
            while queue is not None:
                item = await queue.get()
                if item is None:
                    break
                yield item
            await reader  # raises what ended the stream, if anything did
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status
            await _abort(context, exc, "RelayHeartbeat")
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            if relay and queue is not None:
                self.hub.disconnect(relay, queue)
                log.info("relay %s: heartbeat stream closed", relay)


class AdminServicer(_Base, pb_grpc.AdminServicer):
    @unary
    async def SetNextBoot(self, request: pb.SetNextBootRequest, context: Any) -> pb.NodeInfo:
        caller = await self.auth.admin(context)
        if not request.node:
            raise InvalidArgument("node is required")
        view = await self.write(
            self.service.set_next_boot, request.node, request.environment, caller.principal
        )
        log.info(
            "next boot of %s: %s (set by %s)",
            request.node,
            request.environment or "(cleared)",
            caller.principal,
        )
        return node_pb(view)

    @unary
    async def ListEnvironments(
        self, request: pb.ListEnvironmentsRequest, context: Any
    ) -> pb.ListEnvironmentsResponse:
        await self.auth.admin(context)
        return pb.ListEnvironmentsResponse(
            environments=[environment_pb(v) for v in self.service.list_environments()]
        )

    @unary
    async def GetEnvironment(self, request: pb.GetEnvironmentRequest, context: Any) -> pb.EnvironmentInfo:
        await self.auth.admin(context)
        if not request.name:
            raise InvalidArgument("an environment name is required")
        return environment_pb(self.service.environment_view(request.name))

    @unary
    async def ListNodes(self, request: pb.ListNodesRequest, context: Any) -> pb.ListNodesResponse:
        await self.auth.admin(context)
        views = await self.write(self.service.list_nodes, request.group)
        return pb.ListNodesResponse(nodes=[node_pb(v) for v in views])

    @unary
    async def GetNode(self, request: pb.GetNodeRequest, context: Any) -> pb.NodeInfo:
        await self.auth.admin(context)
        return node_pb(await self.write(self.service.get_node, _node_ref(request.node)))

    @unary
    async def ListRelays(self, request: pb.ListRelaysRequest, context: Any) -> pb.ListRelaysResponse:
        await self.auth.admin(context)
        return pb.ListRelaysResponse(relays=[relay_info_pb(v) for v in self.service.list_relays()])

    @unary
    async def ListBootEvents(
        self, request: pb.ListBootEventsRequest, context: Any
    ) -> pb.ListBootEventsResponse:
        await self.auth.admin(context)
        events = await self.write(self.service.list_events, request.node, request.limit, request.boot_id)
        return pb.ListBootEventsResponse(events=[event_pb(e) for e in events])

    @unary
    async def IssueToken(self, request: pb.IssueTokenRequest, context: Any) -> pb.IssuedToken:
        caller = await self.auth.admin(context)
        kind = _token_kind(request.kind)
        if kind is None:
            raise InvalidArgument("a token's kind is required (admin, node or code)")
        if kind == "admin" and caller.principal.startswith("token:"):
            # a stolen token must not outlive its revocation under another name
            raise PermissionDenied("admin tokens are issued with an admin certificate or on the core's host")
        ttl = request.ttl_seconds or None
        new = await self.write(self.service.issue_token, kind, request.name, ttl, request.retire_others_after)
        log.info("%s token %s issued to %s by %s", kind, new.record.id, new.record.name, caller.principal)
        return pb.IssuedToken(info=token_pb(new.record), token=new.text)

    @unary
    async def ListTokens(self, request: pb.ListTokensRequest, context: Any) -> pb.ListTokensResponse:
        await self.auth.admin(context)
        records = self.service.list_tokens(_token_kind(request.kind), request.name)
        return pb.ListTokensResponse(tokens=[token_pb(r) for r in records])

    @unary
    async def RevokeTokens(self, request: pb.RevokeTokensRequest, context: Any) -> pb.ListTokensResponse:
        caller = await self.auth.admin(context)
        revoked = await self.write(
            self.service.revoke_tokens, request.id, _token_kind(request.kind), request.name
        )
        for r in revoked:
            log.info("%s token %s of %s revoked by %s", r.kind, r.id, r.name, caller.principal)
        return pb.ListTokensResponse(tokens=[token_pb(r) for r in revoked])

    def _harvest(self) -> Harvest:
        if self.harvest is None:
            raise FailedPrecondition("this core runs no desktop harvesting")
        return self.harvest

    @unary
    async def WakeDesktops(self, request: pb.DesktopsRequest, context: Any) -> pb.DesktopsReply:
        caller = await self.auth.admin(context)
        harvest = self._harvest()
        boots = await self.write(self.service.pooled_boots)
        why = f"{request.reason or 'asked'} by {caller.principal}"
        return _desktops_pb(harvest.wake(request.nodes, why[:200], boots))

    @unary
    async def ReleaseDesktops(self, request: pb.DesktopsRequest, context: Any) -> pb.DesktopsReply:
        caller = await self.auth.admin(context)
        harvest = self._harvest()
        boots = await self.write(self.service.pooled_boots)
        why = f"{request.reason or 'asked'} by {caller.principal}"
        return _desktops_pb(harvest.release(request.nodes, why[:200], boots))

    @unary
    async def ReportDesktopJobs(self, request: pb.DesktopJobs, context: Any) -> pb.DesktopsReply:
        await self.auth.admin(context)
        return _desktops_pb(self._harvest().note_jobs(request.busy, request.source[:80] or "unnamed"))

    @unary
    async def HarvestStatus(self, request: pb.HarvestStatusRequest, context: Any) -> pb.HarvestStatusReply:
        await self.auth.admin(context)
        harvest = self._harvest()
        boots = await self.write(self.service.pooled_boots)
        return pb.HarvestStatusReply(
            pools=[_pool_pb(v) for v in harvest.status(request.pool, boots, request.horizon_seconds)],
            now=_ts(self.service.clock()),
        )

    async def Prefetch(
        self, request: pb.PrefetchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.PrefetchProgress]:
        try:
            caller = await self.auth.admin(context)
            if not request.environment:
                raise InvalidArgument("an environment name is required")
            digest, signature, relays = self.service.prefetch_targets(
                request.environment, request.relays, request.nodes
            )
            if not relays:
                raise FailedPrecondition("no relay to warm: the registry has none for these nodes")
            order_id, _ = self.hub.prefetch(request.environment, digest, relays, signature)
            log.info(
                "prefetch %s: %s (%s) on %s, asked by %s",
                order_id,
                request.environment,
                digest,
                ", ".join(relays),
                f"{caller.principal} ({request.requested_by})" if request.requested_by else caller.principal,
            )
            async for relay, status in self.hub.watch(order_id):
                yield pb.PrefetchProgress(relay=relay, status=status)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status
            await _abort(context, exc, "Prefetch")


# -- metrics --------------------------------------------------------------------------------------
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0)
BOOT_STATES = (
    "booting",
    "starting",
    "up",
    "failed",
)  # always exported (0 when none); any other state as it comes


class CallMetrics(grpc.aio.ServerInterceptor):
    """Counts every gRPC call by method and status and times it (streams: until they end)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.calls = Counter(
            "slim_core_grpc_calls",
            "gRPC calls ended, by method and status",
            ["method", "code"],
            registry=registry,
        )
        self.seconds = Histogram(
            "slim_core_grpc_call_seconds",
            "gRPC call duration, by method",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def _done(self, method: str, context: Any, started: float, exc: BaseException | None) -> None:
        if exc is None:
            code = "OK"
        elif isinstance(exc, asyncio.CancelledError):
            code = "CANCELLED"
        elif isinstance(exc, grpc.aio.AbortError):
            status = context.code()
            code = status.name if isinstance(status, grpc.StatusCode) else str(status)
        else:
            code = "UNKNOWN"
        self.calls.labels(method, code).inc()
        self.seconds.labels(method).observe(time.monotonic() - started)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        found = await continuation(details)
        if found is None:  # an unknown method: grpc answers UNIMPLEMENTED
            return found  # type: ignore[return-value]
        handler: Any = found
        method = str(getattr(details, "method", "")).rsplit("/", 1)[-1]
        codec = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary or handler.stream_unary:
            inner = handler.unary_unary or handler.stream_unary

            async def single(request: Any, context: Any) -> Any:
                started = time.monotonic()
                try:
                    answer = await inner(request, context)
                except BaseException as exc:
                    self._done(method, context, started, exc)
                    raise
                self._done(method, context, started, None)
                return answer

            if handler.unary_unary:
                return grpc.unary_unary_rpc_method_handler(single, **codec)
            return grpc.stream_unary_rpc_method_handler(single, **codec)
        streams = handler.unary_stream or handler.stream_stream

        async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
            started = time.monotonic()
            answers = streams(request, context)
            try:
                async for answer in answers:
                    yield answer
            except GeneratorExit:  # closed while paused at yield: the call was cancelled
                self._done(method, context, started, asyncio.CancelledError())
                raise
            except BaseException as exc:
                self._done(method, context, started, exc)
                raise
            else:
                self._done(method, context, started, None)
            finally:
                close = getattr(answers, "aclose", None)
                if close is not None:
                    await close()  # the servicer's own clean-up (a relay's disconnect) runs now

        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(stream, **codec)
        return grpc.stream_stream_rpc_method_handler(stream, **codec)


class StateMetrics(Collector):
    """Nodes by the state of their latest boot (``never``: no boot of record) and relays by
    health, read when scraped (run it on the writer thread: it reads SQLite)."""

    def __init__(self, service: dom.CoreService, harvest: Harvest | None = None) -> None:
        self.service = service
        self.harvest = harvest

    def collect(self) -> Iterator[Metric]:
        yield from self._harvest()
        boots = Tally(dict.fromkeys((*BOOT_STATES, "never"), 0))
        boots.update(v.boot.state if v.boot is not None else "never" for v in self.service.list_nodes())
        family = GaugeMetricFamily(
            "slim_core_nodes", "nodes by the state of their latest boot", labels=["state"]
        )
        for state, count in sorted(boots.items()):
            family.add_metric([state], count)
        yield family
        relays = Tally({str(status): 0 for status in RelayStatus})
        relays.update(str(v.status) for v in self.service.list_relays())
        family = GaugeMetricFamily(
            "slim_core_relays", "relays by health (from their heartbeats)", labels=["status"]
        )
        for status, count in sorted(relays.items()):
            family.add_metric([status], count)
        yield family

    def _harvest(self) -> Iterator[Metric]:
        """Each pool's desktops by state (slim harvest status), and its node-hours."""
        if self.harvest is None or not self.service.registry.pools:
            return
        pools = self.harvest.status("", self.service.pooled_boots())
        desktops = GaugeMetricFamily(
            "slim_harvest_desktops",
            "a pool's desktops by state (slim harvest status)",
            labels=["pool", "state"],
        )
        hours = CounterMetricFamily(
            "slim_harvest_node_hours",
            "node-hours harvested: in the EE (boot states), running jobs (the Slurm side's reports)",
            labels=["pool", "kind"],
        )
        for p in pools:
            tally = Tally(dict.fromkeys(STATES, 0))
            tally.update(d.state for d in p.desktops)
            for state, count in sorted(tally.items()):
                desktops.add_metric([p.name, state], count)
            hours.add_metric([p.name, "ee"], p.node_hours_ee)
            hours.add_metric([p.name, "jobs"], p.node_hours_jobs)
        yield desktops
        yield hours


@dataclass(frozen=True)
class ServerTls:
    """The core's TLS: its key and certificate, the CA its callers' certificates must
    chain to, and the CA's record of which of them are valid (:mod:`slim.pki`)."""

    key: bytes
    cert: bytes
    ca: bytes
    revocations: Revocations

    @classmethod
    def from_ca(cls, ca_dir: Path, names: tuple[str, ...] = ()) -> ServerTls:
        """The CA in ``ca_dir`` (made if missing) and the core's certificate from it."""
        ca = CertificateAuthority.load_or_create(ca_dir)
        key, cert = ca.server_identity(names)
        return cls(key, cert, ca.cert_pem, Revocations(ca_dir))


class CoreServer:
    """The gRPC server around one :class:`CoreService`; owns the writer thread.

    ``listen``: mutual TLS with ``tls`` (relays and admin certificates), plaintext without
    (every caller trusted); a ``unix:`` address is a local socket either way.
    ``admin_listen``: TLS, callers authenticated by admin token.  ``socket``: a local
    socket, mode 0600 (root on the core's host).  See :mod:`slim.core.control.auth`."""

    def __init__(
        self,
        service: dom.CoreService,
        listen: str = "127.0.0.1:50051",
        *,
        tls: ServerTls | None = None,
        admin_listen: str | None = None,
        socket: str | None = None,
    ) -> None:
        self.service = service
        self.listen = listen
        self.tls = tls
        self.admin_listen = admin_listen
        self.socket = socket
        self.port = 0
        self.admin_port = 0
        self._watch: asyncio.Task[None] | None = None
        if admin_listen and tls is None:
            raise InvalidArgument("admin_listen (admin tokens over TLS) needs TLS on")
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slim-state")
        self.metrics = CollectorRegistry(auto_describe=False)
        self.harvest = Harvest(service, self.hub_wake, self._prefetch, self.hub_connected)
        self.metrics.register(StateMetrics(service, self.harvest))
        self._server = grpc.aio.server(
            interceptors=[CallMetrics(self.metrics)],
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        self.hub = RelayHub()
        self.auth = Authenticator(tls.revocations if tls else None, service.tokens, service.clock)
        self._harvesting: asyncio.Task[None] | None = None
        self._warming: set[asyncio.Task[None]] = set()
        pb_grpc.add_CoreServicer_to_server(
            CoreServicer(service, self._writer, self.hub, self.auth, self.harvest), self._server
        )
        pb_grpc.add_AdminServicer_to_server(
            AdminServicer(service, self._writer, self.hub, self.auth, self.harvest), self._server
        )

    def hub_wake(self, relay: str, targets: list[tuple[str, str]], per_minute: int) -> bool:
        return self.hub.wake(relay, targets, per_minute)

    def hub_connected(self) -> list[str]:
        return self.hub.connected()

    def _prefetch(self, environment: str, nodes: list[str]) -> None:
        """The harvest's order to warm ``environment`` on ``nodes``' relays.  Called from its
        tick, on the loop: the release is read from the store off the loop, then ordered."""
        loop = asyncio.get_running_loop()

        async def order() -> None:
            try:
                digest, signature, relays = await loop.run_in_executor(
                    self._writer, self.service.prefetch_targets, environment, [], nodes
                )
                self.hub.prefetch(environment, digest, relays, signature, watched=False)
            except Exception as exc:  # noqa: BLE001 - the night goes on without a warm cache
                log.warning("could not order the relays to warm %s: %s", environment, exc)
                return
            log.info("relays %s ordered to warm %s", ", ".join(relays), environment)

        task = loop.create_task(order(), name=f"warm {environment}")
        self._warming.add(task)
        task.add_done_callback(self._warming.discard)

    async def _harvest_clock(self) -> None:
        """The pools' windows (slim.core.control.harvest): a tick a second while there are pools."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(HARVEST_TICK)
            if not self.service.registry.pools:
                continue
            try:
                boots = await loop.run_in_executor(self._writer, self.service.pooled_boots)
                self.harvest.tick(boots)
                records = self.harvest.snapshot()
                if records is not None:
                    await loop.run_in_executor(self._writer, self.service.state.save_harvest, records)
            except Exception:
                log.exception("desktop harvesting: a tick failed")

    def _bind(self, address: str, credentials: grpc.ServerCredentials | None) -> int:
        try:
            if credentials is None:
                port = self._server.add_insecure_port(address)
            else:
                port = self._server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            raise Unavailable(f"cannot listen on {address}: {exc}") from None
        if port == 0:
            raise Unavailable(f"cannot listen on {address} (address in use or not local?)")
        return port

    async def _local(self, address: str) -> int:
        path = Path(address.removeprefix("unix:"))
        loop = asyncio.get_running_loop()
        if len(os.fsencode(path)) > 107:
            raise InvalidArgument(f"the local socket path {path} is longer than AF_UNIX's 107 bytes")
        # a socket left by a core that died goes; the new one is for root (or the core's user) only
        await loop.run_in_executor(None, functools.partial(path.unlink, missing_ok=True))
        before = os.umask(0o177)  # born 0600: no moment in which others may connect
        try:
            port = self._bind(address, grpc.local_server_credentials(grpc.LocalConnectionType.UDS))
        finally:
            os.umask(before)
        await loop.run_in_executor(None, path.chmod, 0o600)
        return port

    async def start(self) -> int:
        """Bind and start; return the bound port of ``listen`` (useful with port 0)."""
        if self.listen.startswith("unix:"):
            self.port = await self._local(self.listen)
        elif self.tls is None:
            log.warning("TLS is off: every caller of %s is trusted (tls: false)", self.listen)
            self.port = self._bind(self.listen, None)
        else:
            pairs = [(self.tls.key, self.tls.cert)]
            mutual = grpc.ssl_server_credentials(
                pairs, root_certificates=self.tls.ca, require_client_auth=True
            )
            self.port = self._bind(self.listen, mutual)
        if self.admin_listen and self.tls is not None:
            server_only = grpc.ssl_server_credentials([(self.tls.key, self.tls.cert)])
            self.admin_port = self._bind(self.admin_listen, server_only)
        if self.socket and f"unix:{self.socket}" != self.listen:
            await self._local(f"unix:{self.socket}")
        if self.tls is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.tls.revocations.refresh)
            self._watch = asyncio.create_task(self._watch_revocations(), name="revocations")
        # what the harvest did before a restart (the state database: on the writer thread)
        records = await asyncio.get_running_loop().run_in_executor(
            self._writer, self.service.state.harvest_records
        )
        self.harvest.load(records)
        await self._server.start()
        self._harvesting = asyncio.create_task(self._harvest_clock(), name="harvest")
        log.info(
            "core listening on %s (port %d)%s%s", self.listen, self.port,
            f", admin tokens on {self.admin_listen} (port {self.admin_port})" if self.admin_port else "",
            f", local socket {self.socket}" if self.socket else "",
        )  # fmt: skip
        return self.port

    async def _watch_revocations(self) -> None:
        """Re-read the CA's record when it changes (a revocation takes effect within a second)."""
        assert self.tls is not None
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            try:
                await loop.run_in_executor(None, self.tls.revocations.refresh)
            except Exception as exc:  # noqa: BLE001 - damaged or unreadable: keep the last good record
                log.error("the CA's record of certificates was not re-read: %s", exc)

    async def stop(self, grace: float) -> None:
        """Stop accepting calls, give in-flight calls ``grace`` seconds, then cancel them."""
        for task in (self._watch, self._harvesting, *self._warming):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self._server.stop(grace)
        # the writer may be finishing a transaction: wait for it off the event loop
        await asyncio.get_running_loop().run_in_executor(None, self._writer.shutdown)

    async def wait(self) -> None:
        await self._server.wait_for_termination()

    @property
    def writer(self) -> ThreadPoolExecutor:
        """The thread that touches SQLite (metrics are generated there too)."""
        return self._writer


async def serve(
    service: dom.CoreService,
    config: CoreConfig,
    on_ready: Callable[[int], None] | None = None,
    on_objects: Callable[[int], None] | None = None,
    on_admin: Callable[[int], None] | None = None,
) -> None:
    """Run until SIGTERM or SIGINT; SIGHUP reloads the registry (read off the event
    loop, swapped on it).  With ``config.objects_listen``, also serve the store's
    objects over HTTP (the upstream of the relays)."""
    loop = asyncio.get_running_loop()
    tls = None
    if config.tls:  # files: read off the event loop
        tls = await loop.run_in_executor(None, ServerTls.from_ca, config.ca_dir, tuple(config.tls_names))
    server = CoreServer(
        service,
        config.listen,
        tls=tls,
        admin_listen=config.admin_listen,
        socket=str(config.socket_path) if config.socket_path else None,
    )
    port = await server.start()
    objects = None
    if config.objects_listen:
        https = None
        if config.objects_https:  # the core's own certificate (name slim-core), read off the loop
            if tls is None:  # TLS off for gRPC: the certificate is made (if missing) for objects only
                await loop.run_in_executor(None, ServerTls.from_ca, config.ca_dir, tuple(config.tls_names))
            ca = config.ca_dir
            https = await loop.run_in_executor(None, server_context, ca / "core.crt", ca / "core.key")
        objects = ObjectServer(
            service.store.objects, config.objects_listen, metrics_executor=server.writer, tls=https
        )
        objects.metrics.register(_Registered(server.metrics))
        try:
            objects_port = await objects.start()
        except BaseException:
            await server.stop(0)
            raise
        log.info("objects over %s on %s (port %d)", objects.scheme, config.objects_listen, objects_port)
    stopping = asyncio.Event()
    reloading = asyncio.Lock()
    reloads: set[asyncio.Task[None]] = set()

    async def reload() -> None:
        async with reloading:  # one at a time, in the order the signals came
            try:
                registry = await loop.run_in_executor(None, service.read_registry)
            except SlimError as exc:
                log.error("registry not reloaded, keeping the current one:\n%s", exc)
                return
            except Exception:
                log.exception("registry not reloaded (unexpected error), keeping the current one")
                return
            service.use_registry(registry)

    def on_hup() -> None:
        task = loop.create_task(reload(), name="registry reload")
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    loop.add_signal_handler(signal.SIGINT, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    if on_ready is not None:
        on_ready(port)
    if objects is not None and on_objects is not None:
        on_objects(objects.port)
    if server.admin_port and on_admin is not None:
        on_admin(server.admin_port)
    try:
        await stopping.wait()
        log.info("stopping: finishing in-flight calls (grace %.1f s)", config.grace)
        if objects is not None:
            await objects.stop()
        await server.stop(config.grace)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        for task in list(reloads):
            task.cancel()
        await asyncio.gather(*reloads, return_exceptions=True)
    log.info("core stopped")


class _Registered(Collector):
    """Another registry's metrics, collected into this one."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        yield from self.registry.collect()


def run(
    config: CoreConfig,
    on_ready: Callable[[int], None] | None = None,
    on_objects: Callable[[int], None] | None = None,
    on_admin: Callable[[int], None] | None = None,
) -> None:
    """``slim core serve``: open the registry, state and store of ``config`` and serve
    until SIGTERM or SIGINT, on the event loop ``config`` names."""
    registry = load_registry(config.registry)
    config.state.parent.mkdir(parents=True, exist_ok=True)
    state = State(config.state)
    try:
        signer = ReloadingSigner(config.key_dir)  # a new key there (slim keys rotate) is taken up at once
        log.info("plans signed with key %s (%s)", signer.public.id, config.key_dir)
        service = dom.CoreService(
            registry, state, Store(config.store), registry_path=config.registry, signer=signer
        )
        main = serve(service, config, on_ready, on_objects, on_admin)
        if config.event_loop == "uvloop":
            uvloop.run(main)
        else:
            asyncio.run(main)
    finally:
        state.close()
