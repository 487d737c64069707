"""The node API: what agents and iPXE ask a relay, answered by the core.

Nodes speak only HTTP, only to relays; the relay calls the core over gRPC on
the node's behalf with the node's origin address (the TCP peer), so that the
core can pick the site and the best relays.  JSON bodies use plain numbers
and lowercase enum names (see docs/relay.md); the agent parses them with the
standard library.

=====================================  =====================================
``GET /boot/{mac}.ipxe``               the node's iPXE script (text)
``GET /v1/locate?node=N`` or ``mac=M`` ranked relays for the node
``GET /v1/nodes/{node}/plan``          the boot plan ({node}: name or MAC; ``?environment=``: its kernel's)
``POST /v1/nodes/{node}/events``       boot events: one object, a list, or
                                       ``{"events": [...]}`` (at most 1000)
``GET /v1/nodes/{node}/secrets``       the node's secret files (never cached)
=====================================  =====================================

A node may send its token (``Authorization: Bearer TOKEN``, from ``slim node
enroll``); the relay passes it and the node's address to the core, which checks
that the caller may speak for that node (docs/security.md).

Errors come back as ``{"error": message}`` with the status the core's answer
maps to (400, 401, 403, 404, 409; 503 with Retry-After when the core cannot be
reached or too many calls are waiting on it).
"""

from __future__ import annotations

import base64
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from google.protobuf.timestamp_pb2 import Timestamp

from slim.errors import InvalidArgument, NotFound, Overloaded, PermissionDenied, SlimError, Unauthenticated
from slim.relay.corelink import CoreLink
from slim.relay.observe import BootObserver
from slim.rpc import tier_name
from slim.v1 import core_pb2 as pb
from slim.vocabulary import BOOT_ID_RE, MAX_EVENT_TEXT, MAX_STAGE_SECONDS, MAX_TIMESTAMP_SECONDS, names_a_mac

log = logging.getLogger(__name__)

MAX_EVENTS = 1000
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_TOKEN_TEXT = re.compile(r"[A-Za-z0-9._-]{1,256}")  # what a node's token may be made of
MAX_BODY = 1 << 20


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def node_ref(text: str) -> pb.NodeRef:
    return pb.NodeRef(mac=text) if names_a_mac(text) else pb.NodeRef(name=text)


def relay_json(r: pb.RankedRelay) -> dict[str, Any]:
    return {
        "name": r.name,
        "urls": list(r.urls),
        "site": r.site,
        "tier": tier_name(r.tier),
        "score": r.score,
        "heartbeat_seen": r.heartbeat_seen,
    }


def _error(exc: SlimError) -> web.Response:
    headers = {"Retry-After": str(getattr(exc, "retry_after", 2))} if exc.http_status == 503 else None
    return web.json_response({"error": exc.message}, status=exc.http_status, headers=headers)


def event_from_json(node: str, relay: str, rec: Any, index: int) -> pb.BootEvent:
    where = f"event {index}"
    if not isinstance(rec, dict):
        raise InvalidArgument(f"{where}: expected an object, got {type(rec).__name__}")
    known = {"boot_id", "stage", "time", "bytes", "ok", "message", "environment", "node", "duration",
             "boot_key_sha256"}  # fmt: skip
    unknown = sorted(set(rec) - known)
    if unknown:
        raise InvalidArgument(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}")

    def text(key: str, required: bool = False) -> str:
        value = rec.get(key, "")
        if not isinstance(value, str):
            raise InvalidArgument(f"{where}: {key} must be a string")
        if required and not value:
            raise InvalidArgument(f"{where}: {key} is required")
        if len(value) > MAX_EVENT_TEXT:
            raise InvalidArgument(f"{where}: {key} is longer than {MAX_EVENT_TEXT} characters")
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # JSON's lone surrogates ("\\ud800"): protobuf refuses them
                raise InvalidArgument(f"{where}: {key} is not valid Unicode (a lone surrogate)") from None
        return value

    if rec.get("node", node) != node:
        raise InvalidArgument(f"{where}: node {rec.get('node')!r} differs from the URL's {node!r}")
    nbytes = rec.get("bytes", 0)
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or not 0 <= nbytes < 2**63:
        raise InvalidArgument(f"{where}: bytes must be a whole number >= 0")
    ok = rec.get("ok", True)
    if not isinstance(ok, bool):
        raise InvalidArgument(f"{where}: ok must be true or false")
    duration = rec.get("duration", 0)
    if (
        isinstance(duration, bool)
        or not isinstance(duration, int | float)
        or not 0 <= duration <= MAX_STAGE_SECONDS
    ):
        raise InvalidArgument(f"{where}: duration must be seconds from 0 to {MAX_STAGE_SECONDS:g}")
    key_sha256 = text("boot_key_sha256")
    if key_sha256 and not _SHA256_HEX.fullmatch(key_sha256):
        raise InvalidArgument(f"{where}: boot_key_sha256 must be 64 hex digits (a SHA-256)")
    event = pb.BootEvent(
        node=node,
        boot_key_sha256=key_sha256,
        boot_id=text("boot_id", required=True),
        stage=text("stage", required=True),
        relay=relay,
        bytes=nbytes,
        ok=ok,
        message=text("message"),
        environment=text("environment"),
        duration=float(duration),
    )
    # no time: the relay's clock as the event arrives (the EE's report sends none), so that
    # every event of a boot the relays see is on one clock (the agent's are set by the plan's)
    t = rec.get("time", time.time())
    if (
        isinstance(t, bool)
        or not isinstance(t, int | float)
        or not (0 <= t <= MAX_TIMESTAMP_SECONDS)
        or math.isnan(t)
    ):
        raise InvalidArgument(f"{where}: time must be seconds since 1970 (a number)")
    ts = Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    event.time.CopyFrom(ts)
    return event


def events_from_body(node: str, relay: str, raw: bytes) -> list[pb.BootEvent]:
    """The events of a ``POST /v1/nodes/{node}/events`` body (one object, a list, or
    ``{"events": [...]}``); InvalidArgument says what is wrong."""
    return events_and_proof(node, relay, raw)[0]


def events_and_proof(node: str, relay: str, raw: bytes) -> tuple[list[pb.BootEvent], str, str]:
    """:func:`events_from_body`, and the node's token and the boot's key if the body carries
    them (``{"events": [...], "boot_key": "..."}``: how the EE's up report proves its boot,
    never on a command line)."""
    if len(raw) > MAX_BODY:
        raise InvalidArgument(f"body larger than {MAX_BODY} bytes")
    try:
        doc = json.loads(raw)
    except ValueError as exc:  # not JSON, not UTF-8, a number of more than 4300 digits
        raise InvalidArgument(f"body is not JSON: {exc}") from None
    except RecursionError:
        raise InvalidArgument("body is not JSON: nested too deeply") from None
    token = key = ""
    if isinstance(doc, dict) and "events" in doc:
        records = doc["events"]
        token, key = doc.get("token", ""), doc.get("boot_key", "")
        if not isinstance(token, str) or not _TOKEN_TEXT.fullmatch(token or "x"):
            raise InvalidArgument("token must be a SLIM token's text")
        if not isinstance(key, str) or not _TOKEN_TEXT.fullmatch(key or "x"):
            raise InvalidArgument("boot_key must be the boot's key (its agent made it)")
    else:
        records = doc if isinstance(doc, list) else [doc]
    if not isinstance(records, list) or not records:
        raise InvalidArgument("events must be a non-empty list")
    if len(records) > MAX_EVENTS:
        raise InvalidArgument(f"more than {MAX_EVENTS} events in one request; send them in parts")
    return [event_from_json(node, relay, rec, i + 1) for i, rec in enumerate(records)], token, key


class NodeApi:
    def __init__(
        self, link: CoreLink, relay: str, max_calls: int = 256, observer: BootObserver | None = None
    ) -> None:
        self.link = link
        self.relay = relay
        self.observer = observer
        self.max_calls = max_calls
        self.calls = 0
        self.errors = 0
        self.overloaded = 0

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/boot/{mac}.ipxe", self._limited(self.boot_script))
        app.router.add_get("/v1/locate", self._limited(self.locate))
        app.router.add_get("/v1/nodes/{node}/plan", self._limited(self.plan))
        app.router.add_post("/v1/nodes/{node}/events", self._limited(self.events))
        app.router.add_get("/v1/nodes/{node}/secrets", self._limited(self.secrets))
        app.router.add_post("/v1/nodes/{node}/order", self._limited(self.order))
        app.router.add_post("/v1/redeem", self._limited(self.redeem))
        app.router.add_get("/boot/local", self._limited(self.local))

    def _limited(self, handler: Handler) -> Handler:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            if self.calls >= self.max_calls:
                self.overloaded += 1
                return _error(Overloaded(f"{self.calls} requests are waiting on the core; try again", 1))
            self.calls += 1
            try:
                return await handler(request)
            except SlimError as exc:
                self.errors += 1
                return _error(exc)
            finally:
                self.calls -= 1

        return wrapped

    @staticmethod
    def _origin(request: web.Request) -> str:
        return request.remote or ""

    @staticmethod
    def _token(request: web.Request) -> str:
        """The node's token (``Authorization: Bearer TOKEN``), passed to the core unread."""
        header = request.headers.get("Authorization", "")
        if not header:
            return ""
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not _TOKEN_TEXT.fullmatch(token.strip()):
            raise Unauthenticated("Authorization must read 'Bearer TOKEN' (the node's token)")
        return token.strip()

    async def boot_script(self, request: web.Request) -> web.StreamResponse:
        mac = request.match_info["mac"]
        if not names_a_mac(mac):
            raise InvalidArgument(f"{mac[:40]!r} is not a MAC address")
        started = time.time()
        origin = self._origin(request)
        req = pb.GetBootScriptRequest(
            mac=mac, origin=origin, format=pb.SCRIPT_FORMAT_IPXE, node_token=self._token(request)
        )
        script = await self.link.call(self.link.core.GetBootScript, req)
        body = script.script.encode()
        if self.observer is not None:
            self.observer.script_served(
                script.node, script.boot_id, script.default_environment, origin, started, len(body),
                "iPXE script over HTTP",
            )  # fmt: skip
        return web.Response(
            body=body, content_type="text/plain", charset="utf-8", headers={"Cache-Control": "no-store"}
        )

    async def locate(self, request: web.Request) -> web.StreamResponse:
        node, mac = request.query.get("node", ""), request.query.get("mac", "")
        if bool(node) == bool(mac):
            raise InvalidArgument("name the node with ?node=NAME or ?mac=MAC (one of them)")
        ref = pb.NodeRef(name=node) if node else pb.NodeRef(mac=mac)
        found = await self.link.call(
            self.link.core.Locate,
            pb.LocateRequest(node=ref, origin=self._origin(request), node_token=self._token(request)),
        )
        return web.json_response(
            {"node": found.node, "site": found.site, "relays": [relay_json(r) for r in found.relays]},
            headers={"Cache-Control": "no-store"},
        )

    async def plan(self, request: web.Request) -> web.StreamResponse:
        ref = node_ref(request.match_info["node"])
        nonce = request.query.get("nonce", "")
        if nonce and not BOOT_ID_RE.fullmatch(nonce):
            raise InvalidArgument(f"nonce {nonce[:80]!r} is not 1 to 64 hex digits")
        environment = request.query.get("environment", "")
        if len(environment) > 63:
            raise InvalidArgument("environment: at most 63 characters")
        plan = await self.link.call(
            self.link.core.GetBootPlan,
            pb.GetBootPlanRequest(
                node=ref, origin=self._origin(request), nonce=nonce, node_token=self._token(request),
                environment=environment,
            ),
        )  # fmt: skip
        doc: dict[str, Any] = {
            # what the agent acts on: the core's signed document, untouched
            "document": plan.document.decode(),
            "signature": plan.signature,
            # the core key's rotations, oldest first: a boot medium follows them from its key
            "endorsements": [{"key": e.key, "signature": e.signature} for e in plan.endorsements],
            # the relay's clock: the agent sets its events' times by it (a node's clock at
            # power-on is its RTC's, whole seconds at best), so one timeline has one clock
            "relay_time": time.time(),
        }
        return web.json_response(doc, headers={"Cache-Control": "no-store"})

    async def secrets(self, request: web.Request) -> web.StreamResponse:
        """The node's secret files, from the core, handed on and forgotten: never cached,
        logged or put in an event (the core decides who may have them)."""
        ref = node_ref(request.match_info["node"])
        environment = request.query.get("environment", "")
        if len(environment) > 63:
            raise InvalidArgument("environment: at most 63 characters")
        answer = await self.link.call(
            self.link.core.GetNodeSecrets,
            pb.GetNodeSecretsRequest(
                node=ref, origin=self._origin(request), node_token=self._token(request),
                environment=environment, secure=request.secure,
            ),
        )  # fmt: skip
        doc = {
            "secrets": [
                {
                    "path": f.path,
                    "mode": f.mode,
                    "owner": f.owner,
                    "content": base64.b64encode(f.content).decode(),
                }
                for f in answer.secrets
            ]
        }
        return web.json_response(doc, headers={"Cache-Control": "no-store"})

    async def order(self, request: web.Request) -> web.StreamResponse:
        """What a harvested desktop's running EE must do now: the body is JSON, ``{"boot_id":
        ID}`` (and ``"token"`` where the node has one); the core's answer, as plain text,
        ``ACTION POLL_SECONDS`` (ACTION ``none``, ``poweroff`` or ``reboot``), so that a shell
        script reads it with busybox.  ``"boot_key"`` (the boot's key) proves the boot instead
        of a token."""
        ref = node_ref(request.match_info["node"])
        doc = await _json_body(request, '{"boot_id": ID}')
        if not isinstance(doc, dict) or set(doc) - {"boot_id", "token", "boot_key"}:
            raise InvalidArgument("the body must be a JSON object with boot_id (and boot_key or token)")
        boot_id, token, boot_key = doc.get("boot_id"), doc.get("token", ""), doc.get("boot_key", "")
        if not isinstance(boot_key, str) or (boot_key and not _TOKEN_TEXT.fullmatch(boot_key)):
            raise InvalidArgument("boot_key must be the boot's key")
        if not isinstance(boot_id, str) or not BOOT_ID_RE.fullmatch(boot_id):
            raise InvalidArgument("boot_id must name the running boot (1 to 64 hex digits)")
        if not isinstance(token, str) or (token and not _TOKEN_TEXT.fullmatch(token)):
            raise InvalidArgument("token must be the node's token")
        answer = await self.link.call(
            self.link.core.GetNodeOrder,
            pb.GetNodeOrderRequest(
                node=ref, origin=self._origin(request), node_token=self._token(request) or token,
                boot_id=boot_id, secure=request.secure, boot_key=boot_key,
            ),
        )  # fmt: skip
        poll = max(1, round(answer.poll_ms / 1000)) if answer.poll_ms else 15
        text = f"{answer.action or 'none'} {poll}\n"
        return web.Response(text=text, content_type="text/plain", headers={"Cache-Control": "no-store"})

    async def redeem(self, request: web.Request) -> web.StreamResponse:
        """A generic boot medium's first boot: the body ``{"code": "XXXX-XXXX-XXXX-XXXX"}`` (a
        one-time code, slim node code); the answer ``{"node": NAME, "token": TOKEN}``, the node's
        new token.  Over HTTPS only: the answer is a credential."""
        if not request.secure:
            raise PermissionDenied(
                "one-time codes are taken over HTTPS only (the answer is the node's token)"
            )
        doc = await _json_body(request, '{"code": CODE}')
        code = doc.get("code") if isinstance(doc, dict) and set(doc) == {"code"} else None
        if not isinstance(code, str) or not 0 < len(code) <= 64:
            raise InvalidArgument('the body must be a JSON object {"code": CODE} (at most 64 characters)')
        answer = await self.link.call(
            self.link.core.RedeemCode, pb.RedeemCodeRequest(code=code, origin=self._origin(request))
        )
        return web.json_response(
            {"node": answer.node, "token": answer.token}, headers={"Cache-Control": "no-store"}
        )

    async def local(self, request: web.Request) -> web.StreamResponse:
        """A boot menu went to the local disk (``?boot=ID``): recorded as the boot's ``local``
        stage (a desktop's owner may have picked their own OS); the answer is a few bytes."""
        boot_id = request.query.get("boot", "")
        if not BOOT_ID_RE.fullmatch(boot_id):
            raise InvalidArgument("?boot= must name the boot (1 to 64 hex digits)")
        if self.observer is None or not self.observer.local_boot(boot_id, self._origin(request)):
            raise NotFound(f"this relay sent no menu of boot {boot_id} to {self._origin(request) or '?'}")
        return web.Response(text="local\n", content_type="text/plain", headers={"Cache-Control": "no-store"})

    async def events(self, request: web.Request) -> web.StreamResponse:
        node = request.match_info["node"]
        if names_a_mac(node):
            raise InvalidArgument("report events under the node's name (the plan names it), not its MAC")
        if request.content_length is not None and request.content_length > MAX_BODY:
            raise InvalidArgument(f"body larger than {MAX_BODY} bytes")
        token = self._token(request)
        raw = await request.content.read(MAX_BODY + 1)
        events, in_body, boot_key = events_and_proof(node, self.relay, raw)
        token = token or in_body
        origin = self._origin(request)
        if not origin:
            raise InvalidArgument("cannot tell which address the events came from")
        for event in events:  # the node's own: the core checks it is that node
            event.origin = origin
            event.node_token = token
            event.boot_key = boot_key
        accepted = await self.link.report_events(events)
        return web.json_response({"accepted": accepted})


async def _json_body(request: web.Request, example: str) -> object:
    """The request's body as JSON (at most MAX_BODY bytes); InvalidArgument naming ``example``."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise InvalidArgument(f"body larger than {MAX_BODY} bytes")
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise InvalidArgument(f"body larger than {MAX_BODY} bytes")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument(f"the body must be JSON: {example}") from None
