"""SNMP trap and inform receiver: the passive path. Devices tell us about a link going down
before the next poll would notice.

:class:`TrapReceiver` owns one pysnmp engine and one UDP socket. Each accepted notification
(v1 trap, v2c trap or inform, v3 trap or inform) becomes a frozen :class:`TrapEvent` handed to a
synchronous ``on_trap`` callback; informs are acknowledged by pysnmp before the callback runs.
Everything the receiver does not accept is dropped and counted by reason (:attr:`drops`):
wrong community, wrong v3 key, unknown user or sender engine ID, bytes that are not SNMP.

Why the socket is bound here and not by pysnmp: pysnmp binds inside a task and a failure (port
taken, port 162 without CAP_NET_BIND_SERVICE) would only sit in a private future; binding first
makes :meth:`TrapReceiver.start` raise :class:`TrapBindError` (an ``OSError``) on the spot.

v3 traps vs informs: a trap's keys are localized to the *sender's* snmpEngineID, so a v3 trap is
only accepted for the engine IDs listed for its user (``TrapUser.engine_ids``). For an inform the
sender first discovers *our* engine ID, so informs work without that list.

The v1/v2c community travels inside v1 traps translated to v2 form (snmpTrapCommunity.0);
that varbind is removed so that a community never reaches an event, a log or the UI.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import SecretStr

from watchtower.config import TrapListener, TrapUser
from watchtower.probes.snmp import load_hlapi, looks_like_snmp, usm_user, value_text

log = logging.getLogger("watchtower.traps")

SNMP_TRAP_OID = "1.3.6.1.6.3.1.1.4.1.0"  # SNMPv2-MIB::snmpTrapOID.0
SNMP_TRAP_COMMUNITY = "1.3.6.1.6.3.18.1.4.0"  # SNMP-COMMUNITY-MIB::snmpTrapCommunity.0: a secret
LINK_DOWN = "1.3.6.1.6.3.1.1.5.3"  # IF-MIB::linkDown (v1: generic-trap 2)
LINK_UP = "1.3.6.1.6.3.1.1.5.4"  # IF-MIB::linkUp (v1: generic-trap 3)
IF_ENTRY = "1.3.6.1.2.1.2.2.1."  # ifIndex(1), ifDescr(2), ifAdminStatus(7), ifOperStatus(8) ...
# v1 generic-trap numbers -> their SMIv2 notification OIDs (RFC 3584 3.1); pysnmp applies the
# same mapping, this table lets is_link_down() also read events built from raw v1 fields.
V1_GENERIC = {str(n): f"1.3.6.1.6.3.1.1.5.{n + 1}" for n in range(6)}
VERSIONS = {0: "1", 1: "2c", 3: "3"}
RECV_ID = "watchtower-traps"

# Engine MIB counters that mean "a message was received and not delivered", by reason.
# usmStatsUnknownEngineIDs is missing on purpose: it counts discovery requests, which senders of
# v3 informs make before every (first) inform; they are answered, not dropped.
DROP_COUNTERS = {
    ("__SNMPv2-MIB", "snmpInBadCommunityNames"): "bad community",
    ("__SNMPv2-MIB", "snmpInBadVersions"): "bad version",
    ("__SNMPv2-MIB", "snmpInASNParseErrs"): "not SNMP",
    ("__SNMP-USER-BASED-SM-MIB", "usmStatsWrongDigests"): "wrong v3 auth key",
    ("__SNMP-USER-BASED-SM-MIB", "usmStatsUnknownUserNames"): "unknown v3 user or sender engine ID",
    ("__SNMP-USER-BASED-SM-MIB", "usmStatsDecryptionErrors"): "v3 decryption error",
    ("__SNMP-USER-BASED-SM-MIB", "usmStatsUnsupportedSecLevels"): "v3 security level not accepted",
    ("__SNMP-USER-BASED-SM-MIB", "usmStatsNotInTimeWindows"): "v3 message not in time window",
}
MAX_DROP_SOURCES = 256


class TrapBindError(OSError):
    """The receiver could not bind its UDP socket (in use, no permission, no such address)."""


@dataclass(frozen=True, slots=True)
class TrapEvent:
    """One received notification, decoded: safe to log and to show (no community inside)."""

    source: str  # the sender's IP address (IPv4-mapped IPv6 addresses shown as IPv4)
    trap_oid: str  # snmpTrapOID.0; v1 traps as translated by RFC 3584 (linkDown = ...1.1.5.3)
    varbinds: tuple[tuple[str, str], ...]  # (numeric OID, value as text), without snmpTrapOID.0
    version: str  # "1" | "2c" | "3"
    received_at: float  # time.time()

    def value(self, oid: str) -> str | None:
        """The value of the varbind ``oid`` (numeric, no leading dot), if the event has it."""
        return next((value for name, value in self.varbinds if name == oid), None)


def _link_index(event: TrapEvent) -> int | None:
    """The ifIndex a linkDown/linkUp is about: the ifIndex varbind's value, else the instance
    suffix of any ifEntry column (ifOperStatus.N, ifDescr.N, ...) it carries."""
    for name, value in event.varbinds:
        if name.startswith(IF_ENTRY + "1.") and value.isdigit():
            return int(value)
    for name, _ in event.varbinds:
        if name.startswith(IF_ENTRY):
            suffix = name[len(IF_ENTRY) :].split(".")
            if len(suffix) == 2 and suffix[1].isdigit():
                return int(suffix[1])
    return None


def _trap_oid(event: TrapEvent) -> str:
    """snmpTrapOID, also for an event built from a raw v1 trap (enterprise.0.generic form)."""
    oid = event.trap_oid.strip(".")
    if event.version == "1" and oid in V1_GENERIC:  # a bare generic-trap number
        return V1_GENERIC[oid]
    return oid


def is_link_down(event: TrapEvent) -> tuple[bool, int | None]:
    """(True, ifIndex or None) for IF-MIB linkDown (v1 generic-trap 2), else (False, None)."""
    if _trap_oid(event) != LINK_DOWN:
        return False, None
    return True, _link_index(event)


def is_link_up(event: TrapEvent) -> tuple[bool, int | None]:
    """(True, ifIndex or None) for IF-MIB linkUp (v1 generic-trap 3), else (False, None)."""
    if _trap_oid(event) != LINK_UP:
        return False, None
    return True, _link_index(event)


def _plain_address(host: str) -> str:
    """'::ffff:10.0.0.5' -> '10.0.0.5' (what a dual-stack socket reports for IPv4 senders)."""
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6 and host in ("::", ""):
            # [::] should also hear IPv4 senders, whatever net.ipv6.bindv6only says
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        hint = ""
        if exc.errno == errno.EACCES and port < 1024:
            hint = (
                " (ports below 1024 need root or CAP_NET_BIND_SERVICE, e.g. AmbientCapabilities= in "
                "the systemd unit; or listen on a high port and redirect 162 to it)"
            )
        elif exc.errno == errno.EADDRINUSE:
            hint = " (another trap receiver, e.g. snmptrapd, already listens there)"
        elif exc.errno == errno.EADDRNOTAVAIL:
            hint = " (no interface has that address)"
        raise TrapBindError(
            exc.errno, f"cannot listen for SNMP traps on udp {shown}: {exc.strerror}{hint}"
        ) from exc
    return sock


class TrapReceiver:
    """Receives SNMP traps and informs on one UDP address and hands them to ``on_trap``.

    ``on_trap`` runs in the event loop, synchronously, once per accepted notification: keep it
    short (put the event on a queue). An exception in it is logged and counted, never fatal.
    """

    def __init__(
        self,
        on_trap: Callable[[TrapEvent], None],
        *,
        host: str = "0.0.0.0",
        port: int = 162,
        communities: Iterable[str | SecretStr] = (),
        users: Iterable[TrapUser] = (),
    ):
        self.on_trap = on_trap
        self.host = host
        self.port = port
        self._communities = [c.get_secret_value() if isinstance(c, SecretStr) else c for c in communities]
        self._users = list(users)
        self._engine: Any = None
        self._receiver: Any = None
        self._sock: socket.socket | None = None
        self.received = 0  # notifications delivered to on_trap
        self.callback_errors = 0
        self.drops: Counter[str] = Counter()  # reason -> messages dropped
        self.drop_sources: dict[str, str] = {}  # sender -> last drop reason (the newest 256)

    @classmethod
    def from_config(cls, listener: TrapListener, on_trap: Callable[[TrapEvent], None]) -> TrapReceiver:
        host, port = listener.host_port
        return cls(on_trap, host=host, port=port, communities=listener.community_list(), users=listener.users)

    @property
    def dropped(self) -> int:
        return sum(self.drops.values())

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port): with ``port=0`` the port the kernel picked."""
        if self._sock is None:
            return self.host, self.port
        name = self._sock.getsockname()
        return str(name[0]), int(name[1])

    async def start(self) -> None:
        """Bind and start receiving. Raises :class:`TrapBindError` if the address cannot be bound."""
        if self._sock is not None:
            return
        sock = _bind(self.host, self.port)
        try:
            # ~100 ms of CPU for the engine, plus ~1 MB of hashing per v3 key and engine ID to
            # localize keys: done off the event loop, which keeps probing meanwhile
            engine = await asyncio.to_thread(self._build)
            self._engine, self._sock = engine, sock
            self._attach(engine, sock)
        except BaseException:
            self.close()
            sock.close()
            raise
        log.info("listening for SNMP traps on udp %s:%d", *self.address)

    def _build(self) -> Any:
        """A configured engine, not yet attached to a transport (no event loop needed)."""
        from pysnmp.entity import config

        hlapi = load_hlapi()
        engine = hlapi.SnmpEngine()

        for number, community in enumerate(self._communities):
            # one entry serves v1 and v2c; the index is only a name (no secret in it)
            config.add_v1_system(engine, f"wt-community-{number}", community)
        for user in self._users:
            auth_key, priv_key = user.secret("auth_key"), user.secret("priv_key")
            engine_ids: list[bytes | None] = [None]  # None: our own engine ID, for informs
            engine_ids += [bytes.fromhex(e) for e in user.engine_ids]
            for engine_id in engine_ids:
                data = usm_user(
                    hlapi,
                    user.username,
                    user.auth_protocol,
                    auth_key.get_secret_value() if auth_key else None,
                    user.priv_protocol,
                    priv_key.get_secret_value() if priv_key else None,
                    engine_id=engine_id,
                )
                config.add_v3_user(
                    engine,
                    data.userName,
                    data.authentication_protocol,
                    data.authentication_key,
                    data.privacy_protocol,
                    data.privacy_key,
                    securityEngineId=data.securityEngineId,
                )
        return engine

    def _attach(self, engine: Any, sock: socket.socket) -> None:
        from pysnmp.carrier.asyncio.dgram import udp, udp6
        from pysnmp.entity import config
        from pysnmp.entity.rfc3413 import ntfrcv

        module: Any = udp6 if sock.family == socket.AF_INET6 else udp
        transport = module.Udp6AsyncioTransport() if module is udp6 else module.UdpAsyncioTransport()
        config.add_transport(engine, module.DOMAIN_NAME, transport.open_server_mode(sock=sock))
        # Every datagram passes _receive first (see watchtower.probes.snmp._Engine for why).
        dispatcher = engine.transport_dispatcher
        dispatcher.register_recv_callback(self._receive, RECV_ID)
        dispatcher.register_routing_callback(lambda domain, address, message: RECV_ID)
        self._receiver = ntfrcv.NotificationReceiver(engine, self._on_notification)

    # ---- the receive path

    def _counters(self) -> dict[tuple[str, str], int]:
        builder = self._engine.get_mib_builder() if self._engine is not None else None
        if builder is None:
            return {}
        found = {}
        for key in DROP_COUNTERS:
            (symbol,) = builder.import_symbols(*key)
            found[key] = int(symbol.syntax)
        return found

    def _drop(self, source: str, reason: str) -> None:
        self.drops[reason] += 1
        self.drop_sources.pop(source, None)
        self.drop_sources[source] = reason
        if len(self.drop_sources) > MAX_DROP_SOURCES:
            del self.drop_sources[next(iter(self.drop_sources))]
        log.debug("dropped SNMP message from %s: %s", source, reason)

    def _receive(self, dispatcher: Any, domain: Any, address: Any, message: bytes) -> None:
        source = _plain_address(str(address[0]))
        if not looks_like_snmp(message):
            self._drop(source, "not SNMP")
            return
        before = self._counters()
        try:
            self._engine.message_dispatcher.receive_message(self._engine, domain, address, message)
        except Exception as exc:  # pysnmp choking on a hostile message must not stop the receiver
            log.debug("undecodable SNMP message from %s: %r", source, exc)
            self._drop(source, "not SNMP")
            return
        after = self._counters()
        for key, reason in DROP_COUNTERS.items():
            if after.get(key, 0) > before.get(key, 0):
                self._drop(source, reason)

    def _on_notification(
        self,
        engine: Any,
        state_reference: Any,
        context_engine_id: Any,
        context_name: Any,
        var_binds: Any,
        cb_ctx: Any,
    ) -> None:
        context = engine.observer.get_execution_context("rfc3412.receiveMessage:request") or {}
        source = _plain_address(str(context.get("transportAddress", ("?",))[0]))
        version = VERSIONS.get(int(context.get("messageProcessingModel", -1)), "?")
        trap_oid = ""
        varbinds: list[tuple[str, str]] = []
        for name, value in var_binds:
            oid = ".".join(map(str, tuple(name)))
            if oid == SNMP_TRAP_OID:
                trap_oid = value_text(value)
            elif oid != SNMP_TRAP_COMMUNITY:
                varbinds.append((oid, value_text(value)))
        event = TrapEvent(source, trap_oid, tuple(varbinds), version, time.time())
        self.received += 1
        try:
            self.on_trap(event)
        except Exception:  # the callback's bug must not lose the next trap or kill the receiver
            self.callback_errors += 1
            log.exception("trap callback failed for %s from %s", event.trap_oid, event.source)

    # ---- lifecycle

    def close(self) -> None:
        """Stop receiving and release the socket. Idempotent."""
        engine, self._engine = self._engine, None
        if engine is not None:
            if self._receiver is not None:
                self._receiver.close(engine)
                self._receiver = None
            try:
                engine.close_dispatcher()
            except Exception as exc:  # the loop may be closing already; the socket is closed below
                log.debug("closing the trap engine: %r", exc)
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def __aenter__(self) -> TrapReceiver:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
