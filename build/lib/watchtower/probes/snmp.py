"""``snmp``: SNMP GETs with checks, IF-MIB interface status and HOST-RESOURCES storage use.

One probe = a few walks (only when interfaces, storage or ``walk`` checks need a table) and one
GET for everything else, all under the hard deadline ``ctx.timeout``. pysnmp 7 asyncio, numeric
OIDs only (no MIB files are loaded or needed), v1 / v2c / v3 (noAuth, auth, authPriv).

Engines. ``SnmpEngine()`` costs ~100 ms of CPU (it builds pysnmp's MIB instrumentation) and
~0.7 MB, and each one runs a 10 Hz timer task that is never stopped unless the engine is closed,
so one engine per path would be slow, big and leak on every config reload. Instead engines are
shared per event loop: one for all v1/v2c paths, one per distinct SNMPv3 credential set (pysnmp's
configuration cache keys v3 users by user name only, so two agents with the same user name but
different keys must not share an engine: they would reconfigure each other mid-request). With a
warm engine a probe costs ~1-2 ms of CPU. The engine is built in a worker thread so the event
loop (and the latency of every other probe) is not stalled for those 100 ms.

What the network can do, and what the probe says:

* silence: v1/v2c agents silently drop requests with a wrong community, and v3 agents what they
  cannot decrypt (a wrong priv_key: AES-CFB "decrypts" anything into garbage). pysnmp's retries
  end at ~75% of the deadline; the rest is spent on one credential-free SNMPv3 discovery request
  on a connected socket, which tells "the agent is alive, so your community / priv_key is wrong"
  (most agents answer it) and "nothing listens there" (ICMP port unreachable -> ``refused``)
  from plain silence (``timeout``).
* v3 authentication: the agent answers with a report, so a wrong auth key, an unknown user or a
  refused security level fails fast (``error``) with the reason, not as a timeout.
* something that is not an SNMP agent answering: pysnmp would drop (or choke on) such datagrams
  and wait for its timeout. Every datagram passes our receive hook first, which counts what each
  peer sends; the first one that is not SNMP ends the probe at once as ``protocol``.
* noSuchObject / noSuchInstance / endOfMibView (v2c, v3) and noSuchName (v1): ``content``
  failure naming the OID (v1 then asks again for the other OIDs, so they are still checked).

Secrets (community, keys) never appear in details: pysnmp's error texts do not contain them and
this module never formats them.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import re
import secrets
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from watchtower.config import SnmpCheck, SnmpPath
from watchtower.probes import Failure, ProbeContext, ProbeResult

# Numeric OIDs: pysnmp 7 bundles neither IF-MIB nor HOST-RESOURCES-MIB, and numeric OIDs skip the
# MIB lookups entirely (cheaper, and nothing to install).
IF_DESCR = (1, 3, 6, 1, 2, 1, 2, 2, 1, 2)
IF_OPER_STATUS = (1, 3, 6, 1, 2, 1, 2, 2, 1, 8)
IF_NAME = (1, 3, 6, 1, 2, 1, 31, 1, 1, 1, 1)
HR_STORAGE_DESCR = (1, 3, 6, 1, 2, 1, 25, 2, 3, 1, 3)
HR_STORAGE_SIZE = (1, 3, 6, 1, 2, 1, 25, 2, 3, 1, 5)
HR_STORAGE_USED = (1, 3, 6, 1, 2, 1, 25, 2, 3, 1, 6)
OPER_STATUS = {
    1: "up",
    2: "down",
    3: "testing",
    4: "unknown",
    5: "dormant",
    6: "notPresent",
    7: "lowerLayerDown",
}

RECV_ID = "watchtower"  # our receive callback in pysnmp's transport dispatcher
MAX_WALK_ROWS = 5000  # a switch stack has a few thousand ifTable rows; beyond that, stop walking
GET_CHUNK = 20  # OIDs per GET PDU: well below any agent's PDU size limit
BULK_REPETITIONS = 25

Oid = tuple[int, ...]
log = logging.getLogger("watchtower.snmp")


def _oid(text: str) -> Oid:
    return tuple(int(part) for part in text.strip(".").split("."))


def _dotted(oid: Oid) -> str:
    return ".".join(map(str, oid))


class _Failed(Exception):
    """Ends the probe with a failure: raised by the request helpers, caught once in :func:`probe`."""

    def __init__(self, failure: Failure, detail: str):
        super().__init__(detail)
        self.failure = failure
        self.detail = detail


class _TimedOut(Exception):
    """pysnmp gave up waiting (RequestTimedOut): the same story as our own deadline expiring."""


# --------------------------------------------------------------------------- pysnmp, lazily


def load_hlapi() -> Any:
    # Imported on first use: the import costs ~150 ms and most `watchtower` commands never need it.
    import pysnmp.hlapi.v3arch.asyncio as hlapi

    return hlapi


AUTH_PROTOCOLS = {
    "MD5": "usmHMACMD5AuthProtocol",
    "SHA": "usmHMACSHAAuthProtocol",
    "SHA224": "usmHMAC128SHA224AuthProtocol",
    "SHA256": "usmHMAC192SHA256AuthProtocol",
    "SHA384": "usmHMAC256SHA384AuthProtocol",
    "SHA512": "usmHMAC384SHA512AuthProtocol",
}
# net-snmp's AES192/AES256 localize the key the Blumenthal way; Cisco (and net-snmp's AES192C /
# AES256C) the Reeder way. pysnmp names the Reeder variant plainly, hence the swap.
PRIV_PROTOCOLS = {
    "DES": "usmDESPrivProtocol",
    "AES": "usmAesCfb128Protocol",
    "AES192": "usmAesBlumenthalCfb192Protocol",
    "AES256": "usmAesBlumenthalCfb256Protocol",
    "AES192C": "usmAesCfb192Protocol",
    "AES256C": "usmAesCfb256Protocol",
}


def usm_user(
    hlapi: Any,
    username: str,
    auth_protocol: str,
    auth_key: str | None,
    priv_protocol: str,
    priv_key: str | None,
    engine_id: bytes | None = None,
) -> Any:
    """A pysnmp ``UsmUserData``; the security level follows from which keys are given."""
    kwargs: dict[str, Any] = {}
    if auth_key is not None:
        kwargs["authProtocol"] = getattr(hlapi, AUTH_PROTOCOLS[auth_protocol])
        if priv_key is not None:
            kwargs["privProtocol"] = getattr(hlapi, PRIV_PROTOCOLS[priv_protocol])
    if engine_id is not None:
        kwargs["securityEngineId"] = engine_id
    return hlapi.UsmUserData(username, auth_key, priv_key if auth_key is not None else None, **kwargs)


# --------------------------------------------------------------------------- shared engines


@dataclass
class _PeerStats:
    """Datagrams from one watched address, counted before pysnmp parses (and maybe drops) them."""

    watchers: int = 0
    datagrams: int = 0
    not_snmp: int = 0
    first_bad: bytes = b""
    bad: asyncio.Event = field(default_factory=asyncio.Event)  # set on the first non-SNMP datagram


@dataclass
class _Engine:
    engine: Any
    loop: asyncio.AbstractEventLoop
    domains: set[tuple[int, ...]] = field(default_factory=set)
    peers: dict[tuple[str, int], _PeerStats] = field(default_factory=dict)

    def ensure_transport(self, ipv6: bool) -> None:
        """Open the client socket for this address family (once) and hook the datagram counter."""
        from pysnmp.carrier.asyncio.dgram import udp, udp6
        from pysnmp.entity import config

        module: Any = udp6 if ipv6 else udp
        if module.DOMAIN_NAME in self.domains:
            return
        transport = (udp6.Udp6AsyncioTransport() if ipv6 else udp.UdpAsyncioTransport()).open_client_mode()
        config.add_transport(self.engine, module.DOMAIN_NAME, transport)
        if not self.domains:
            # Every datagram goes through _receive instead of straight into pysnmp (routing picks
            # our receiver): it counts what each watched peer sends, and keeps garbage away from
            # pysnmp, whose decoder raises on some byte strings (an "Exception in callback" log
            # line per datagram, and the request just times out).
            dispatcher = self.engine.transport_dispatcher
            dispatcher.register_recv_callback(self._receive, RECV_ID)
            dispatcher.register_routing_callback(lambda domain, address, message: RECV_ID)
        self.domains.add(module.DOMAIN_NAME)

    def _receive(self, dispatcher: Any, domain: Any, address: Any, message: bytes) -> None:
        stats = self.peers.get((str(address[0]), int(address[1])))
        if stats is not None:
            stats.datagrams += 1
        if looks_like_snmp(message):
            before = parse_errors(self.engine)
            try:
                self.engine.message_dispatcher.receive_message(self.engine, domain, address, message)
            except Exception as exc:  # what pysnmp cannot digest is the peer's problem, not ours
                log.debug("undecodable SNMP message from %s: %r", address, exc)
            else:
                # pysnmp drops most malformed messages quietly, counting them in its own MIB
                if parse_errors(self.engine) == before:
                    return
        if stats is not None:
            stats.not_snmp += 1
            stats.first_bad = stats.first_bad or bytes(message[:16])
            stats.bad.set()

    @contextmanager
    def watch(self, address: tuple[str, int]) -> Iterator[_PeerStats]:
        """Count datagrams from ``address`` while a probe talks to it (only watched ones are counted,
        so random senders cannot grow the table)."""
        stats = self.peers.setdefault(address, _PeerStats())
        stats.watchers += 1
        try:
            yield stats
        finally:
            stats.watchers -= 1
            if stats.watchers == 0:
                self.peers.pop(address, None)

    def close(self) -> None:
        with suppress(Exception):  # the loop may already be closed; nothing useful to report
            self.engine.close_dispatcher()


def parse_errors(engine: Any) -> int:
    """The engine's count of messages it could not parse (snmpInASNParseErrs + snmpInBadVersions)."""
    builder = engine.get_mib_builder()
    total = 0
    for name in ("snmpInASNParseErrs", "snmpInBadVersions"):
        (symbol,) = builder.import_symbols("__SNMPv2-MIB", name)
        total += int(symbol.syntax)
    return total


def looks_like_snmp(message: bytes) -> bool:
    """Cheap structural test pysnmp itself starts with: a BER SEQUENCE with an INTEGER version."""
    from pysnmp.proto.api import verdec
    from pysnmp.proto.error import ProtocolError

    try:
        verdec.decode_message_version(message)
    except ProtocolError:
        return False
    except Exception:  # pyasn1 on hostile bytes: whatever it raises, the datagram is not SNMP
        return False
    return True


_ENGINES: dict[tuple[int, str], tuple[asyncio.AbstractEventLoop, asyncio.Task[_Engine]]] = {}


def _engine_group(spec: SnmpPath) -> str:
    """Which shared engine a path uses: all communities share one, v3 credentials get their own."""
    if spec.version != "3":
        return "community"
    parts = [spec.username or "", spec.auth_protocol, spec.priv_protocol]
    for name in ("auth_key", "priv_key"):
        secret = spec.secret(name)
        parts.append("" if secret is None else secret.get_secret_value())
    # A digest, so no data structure of this module holds key material as a plain dict key.
    return "usm:" + hashlib.sha256("\0".join(parts).encode()).hexdigest()


async def _shared_engine(group: str) -> _Engine:
    loop = asyncio.get_running_loop()
    for key, (owner, task) in list(_ENGINES.items()):
        if owner.is_closed():  # left over from an earlier event loop (tests, a restarted daemon)
            del _ENGINES[key]
            if task.done() and not task.cancelled() and task.exception() is None:
                task.result().close()
    key = (id(loop), group)
    entry = _ENGINES.get(key)
    if entry is None or (entry[1].done() and (entry[1].cancelled() or entry[1].exception() is not None)):

        async def build() -> _Engine:
            # the first one also imports pysnmp (~150 ms): in the thread too
            engine = await asyncio.to_thread(lambda: load_hlapi().SnmpEngine())
            return _Engine(engine, loop)

        entry = (loop, loop.create_task(build(), name=f"snmp-engine-{group[:12]}"))
        _ENGINES[key] = entry
    # shield: a probe hitting its deadline must not cancel an engine other probes wait for
    return await asyncio.shield(entry[1])


def close_engines() -> None:
    """Close the shared SNMP engines of the running (or every) event loop: their sockets and timer
    tasks. For daemon shutdown and test teardown; the next probe builds a new engine."""
    try:
        current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        current = None
    for key, (owner, task) in list(_ENGINES.items()):
        if current is not None and owner is not current and not owner.is_closed():
            continue
        del _ENGINES[key]
        if task.done():
            if not task.cancelled() and task.exception() is None:
                task.result().close()
        elif not owner.is_closed():
            task.cancel()


# --------------------------------------------------------------------------- values


def _kind(value: Any) -> str | None:
    """'noSuchObject' / 'noSuchInstance' / 'endOfMibView' for SNMP exception values, else None."""
    from pysnmp.proto import rfc1905

    if isinstance(value, rfc1905.NoSuchObject):
        return "noSuchObject"
    if isinstance(value, rfc1905.NoSuchInstance):
        return "noSuchInstance"
    if isinstance(value, rfc1905.EndOfMibView):
        return "endOfMibView"
    return None


def _number(value: Any) -> float | None:
    """Integer, Counter, Gauge, TimeTicks -> their number; a text that is a number ("0.15", as
    UCD-SNMP's laLoad says it) -> that; anything else None."""
    from pyasn1.type import univ

    if isinstance(value, univ.Integer):
        return float(int(value))
    if isinstance(value, univ.OctetString) and not _is_ip(value):
        try:
            return float(value_text(value))
        except ValueError:
            return None
    return None


def _is_ip(value: Any) -> bool:
    from pysnmp.proto import rfc1902

    # by tag, not class: v1 traps translated to v2 form carry SNMPv1's (rfc1155) IpAddress class
    return bool(getattr(value, "tagSet", None) == rfc1902.IpAddress.tagSet)


def value_text(value: Any) -> str:
    """The value as an admin would write it in a check: ints plain, strings decoded, OIDs dotted."""
    from pyasn1.type import univ

    if isinstance(value, univ.Integer):
        return str(int(value))
    if _is_ip(value):
        return str(value.prettyPrint())
    if isinstance(value, univ.OctetString):
        raw = bytes(value).rstrip(b"\0")  # some agents NUL-terminate their strings
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return "0x" + raw.hex()
        return text if text.isprintable() else "0x" + raw.hex()
    if isinstance(value, univ.ObjectIdentifier):
        return _dotted(tuple(value))
    return str(value.prettyPrint())


def _shown(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _fmt_num(number: float) -> str:
    return str(int(number)) if number == int(number) else f"{number:g}"


def _same(expected: str | int | float, value: Any) -> bool:
    if isinstance(expected, (int, float)) and not isinstance(expected, bool):
        number = _number(value)
        return number is not None and number == float(expected)
    return value_text(value) == str(expected)


def judge(check: SnmpCheck, value: Any) -> str | None:
    """None when ``value`` satisfies ``check``; else what is wrong, as 'got X, expected Y'."""
    shown = _shown(value_text(value))
    if check.equals is not None:
        if not _same(check.equals, value):
            return f"= {shown}, expected {check.equals}"
    elif check.in_ is not None:
        if not any(_same(option, value) for option in check.in_):
            return f"= {shown}, expected one of {', '.join(map(str, check.in_))}"
    elif check.min is not None or check.max is not None:
        number = _number(value)
        if number is None:
            return f"= {shown}, expected a number"
        if check.min is not None and number < check.min:
            return f"= {shown}, expected at least {_fmt_num(check.min)}"
        if check.max is not None and number > check.max:
            return f"= {shown}, expected at most {_fmt_num(check.max)}"
    elif check.regex is not None and re.search(check.regex, value_text(value)) is None:
        return f"= {shown}, expected a match for /{check.regex}/"
    return None


def _unsigned32(value: Any) -> int:
    # hrStorageSize/Used are Integer32: agents with >8 TiB of 4 KiB blocks wrap to negative numbers.
    # Reading them as unsigned is right for one wrap, which covers file systems up to 16 TiB.
    number = int(value)
    return number + 2**32 if number < 0 else number


# --------------------------------------------------------------------------- one conversation


@dataclass
class _Session:
    """One probe's conversation with one agent."""

    hlapi: Any
    shared: _Engine
    auth: Any
    target: Any
    v1: bool
    requests: int = 0
    answered: int = 0  # requests the agent answered: it is alive and takes our credentials

    async def _call(self, coroutine: Any) -> tuple[Any, Any, Any, Sequence[Any]]:
        self.requests += 1
        err_ind, err_stat, err_idx, var_binds = await coroutine
        if err_ind:
            _raise_indication(err_ind)
        self.answered += 1
        return err_ind, err_stat, err_idx, var_binds

    async def get(self, oids: Sequence[Oid]) -> dict[Oid, Any]:
        """GET ``oids`` (chunked). Missing objects come back as their exception value (v1's
        noSuchName is turned into noSuchObject for the offending OID and the rest asked again)."""
        from pysnmp.proto import rfc1905

        found: dict[Oid, Any] = {}
        pending = [list(oids[i : i + GET_CHUNK]) for i in range(0, len(oids), GET_CHUNK)]
        while pending:
            chunk = pending.pop()
            if not chunk:
                continue
            _, err_stat, err_idx, var_binds = await self._call(
                self.hlapi.get_cmd(
                    self.shared.engine,
                    self.auth,
                    self.target,
                    self.hlapi.ContextData(),
                    *(self._object(oid) for oid in chunk),
                    lookupMib=False,
                )
            )
            if err_stat:
                status = _status_name(err_stat)
                index = int(err_idx) - 1
                if status == "noSuchName" and 0 <= index < len(chunk):
                    found[chunk[index]] = rfc1905.noSuchObject
                    pending.append(chunk[:index] + chunk[index + 1 :])
                    continue
                if status == "tooBig" and len(chunk) > 1:
                    half = len(chunk) // 2
                    pending += [chunk[:half], chunk[half:]]
                    continue
                where = f" for {_dotted(chunk[index])}" if 0 <= index < len(chunk) else ""
                raise _Failed(Failure.ERROR, f"the agent answered {status}{where}{_hint(status)}")
            for name, value in var_binds:
                found[tuple(name)] = value
        return found

    async def walk(self, column: Oid) -> list[tuple[Oid, Any]]:
        """Every (index suffix, value) under ``column``; GETBULK on v2c/v3, GETNEXT on v1."""
        rows: list[tuple[Oid, Any]] = []
        last = column
        while len(rows) < MAX_WALK_ROWS:
            if self.v1:
                request = self.hlapi.next_cmd(
                    self.shared.engine, self.auth, self.target, self.hlapi.ContextData(),
                    self._object(last), lookupMib=False,
                )  # fmt: skip
            else:
                request = self.hlapi.bulk_cmd(
                    self.shared.engine, self.auth, self.target, self.hlapi.ContextData(),
                    0, BULK_REPETITIONS, self._object(last), lookupMib=False,
                )  # fmt: skip
            _, err_stat, _, var_binds = await self._call(request)
            if err_stat:
                if _status_name(err_stat) == "noSuchName":  # v1's way of saying "end of the MIB"
                    return rows
                status = _status_name(err_stat)
                raise _Failed(
                    Failure.ERROR, f"the agent answered {status} walking {_dotted(column)}{_hint(status)}"
                )
            if not var_binds:
                return rows
            for name, value in var_binds:
                oid = tuple(name)
                if oid[: len(column)] != column or _kind(value) is not None:
                    return rows
                if oid <= last:
                    raise _Failed(
                        Failure.PROTOCOL, f"the agent returned OIDs out of order walking {_dotted(column)}"
                    )
                rows.append((oid[len(column) :], value))
                last = oid
        return rows

    def _object(self, oid: Oid) -> Any:
        return self.hlapi.ObjectType(self.hlapi.ObjectIdentity(_dotted(oid)))


STATUS_HINTS = {
    "authorizationError": "its access rules (VACM) refuse this user or community for this OID or "
    "security level",
    "genErr": "it failed to read the value",
    "noAccess": "the object is not accessible",
}


def _hint(status: str) -> str:
    hint = STATUS_HINTS.get(status)
    return f": {hint}" if hint else ""


def _status_name(err_stat: Any) -> str:
    with suppress(Exception):
        return str(err_stat.prettyPrint())
    return str(err_stat)


def _raise_indication(err_ind: Any) -> None:
    """Turn a pysnmp errorIndication into the probe's failure."""
    from pysnmp.proto import errind

    if isinstance(err_ind, errind.RequestTimedOut):
        raise _TimedOut()
    text = str(err_ind)
    if isinstance(err_ind, (errind.WrongDigest, errind.AuthenticationFailure, errind.AuthenticationError)):
        raise _Failed(
            Failure.ERROR, f"SNMPv3 authentication failed ({text}): check auth_key and auth_protocol"
        )
    if isinstance(err_ind, (errind.DecryptionError, errind.UnsupportedPrivProtocol)):
        raise _Failed(Failure.ERROR, f"SNMPv3 decryption failed ({text}): check priv_key and priv_protocol")
    if isinstance(err_ind, (errind.UnknownUserName, errind.UnknownSecurityName)):
        raise _Failed(Failure.ERROR, f"SNMPv3: the agent does not know this user ({text})")
    if isinstance(err_ind, errind.UnsupportedSecurityLevel):
        raise _Failed(
            Failure.ERROR,
            f"SNMPv3: the agent refuses this security level ({text}): give both auth_key and priv_key, "
            "or match what the agent's user is set up for",
        )
    raise _Failed(Failure.ERROR, f"SNMP error: {text}")


# --------------------------------------------------------------------------- the probe


@dataclass
class _Outcome:
    problems: list[str] = field(default_factory=list)
    good: list[str] = field(default_factory=list)
    values: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class IndexMemo:
    """Which row an interface name or a storage descr was found in, kept in the path's
    ``ctx.state`` so that a warm probe needs one GET instead of walking ifTable and hrStorageTable
    every time (a third of the CPU for a small agent, much more for a switch). The GET re-reads
    the name at the remembered row; when it no longer matches (reboot, hot-plug renumbering the
    rows) the memo is dropped and the probe walks again."""

    interfaces: dict[str, tuple[Oid, int]] = field(default_factory=dict)  # name -> (column, ifIndex)
    storage: dict[str, int] = field(default_factory=dict)  # hrStorageDescr -> hrStorageIndex


class _StaleMemo(Exception):
    """A remembered row now holds something else: walk again."""


async def _run(spec: SnmpPath, session: _Session, memo: IndexMemo) -> _Outcome:
    try:
        return await _attempt(spec, session, memo)
    except _StaleMemo:
        memo.interfaces.clear()
        memo.storage.clear()
        return await _attempt(spec, session, memo)


async def _attempt(spec: SnmpPath, session: _Session, memo: IndexMemo) -> _Outcome:
    out = _Outcome()
    want: list[Oid] = []  # one GET, after the walks, collects every single value we need

    # ---- walks first: they decide which instances the GET must ask for
    walked: dict[int, list[tuple[Oid, Any]]] = {}  # by position: checks with lists are unhashable
    for position, check in enumerate(spec.checks):
        if check.walk:
            walked[position] = await session.walk(_oid(check.oid))
        else:
            want.append(_oid(check.oid))

    if_index: dict[int | str, int | None] = {}
    verify: dict[Oid, str] = {}  # remembered rows: the OID that must still hold this name
    if spec.interfaces:
        names = {item for item in spec.interfaces if isinstance(item, str)}
        unknown = names - memo.interfaces.keys()
        columns: tuple[Oid, ...] = (IF_DESCR, IF_NAME)
        for column in columns:  # ifDescr first; ifName when a name is still missing
            if not unknown:
                break
            for suffix, value in await session.walk(column):
                text = value_text(value)
                if text in unknown:
                    memo.interfaces[text] = (column, suffix[0])
                    unknown.discard(text)
        for item in spec.interfaces:
            if isinstance(item, int):
                if_index[item] = item
            elif item in memo.interfaces:
                name_column, row = memo.interfaces[item]
                if_index[item] = row
                verify[(*name_column, row)] = item
            else:
                if_index[item] = None
        for found_index in {i for i in if_index.values() if i is not None}:
            want += [(*IF_OPER_STATUS, found_index), (*IF_DESCR, found_index)]

    storage_index: dict[str, int | None] = {}
    known = ""
    if spec.storage:
        wanted = {entry.descr for entry in spec.storage}
        if not wanted <= memo.storage.keys():
            descrs = {value_text(value): suffix[0] for suffix, value in await session.walk(HR_STORAGE_DESCR)}
            memo.storage.update({descr: index for descr, index in descrs.items() if descr in wanted})
            known = ", ".join(sorted(descrs)[:12]) or "none"
        for entry in spec.storage:
            hr = memo.storage.get(entry.descr)
            storage_index[entry.descr] = hr
            if hr is not None:
                want += [(*HR_STORAGE_SIZE, hr), (*HR_STORAGE_USED, hr)]
                verify[(*HR_STORAGE_DESCR, hr)] = entry.descr
    want += list(verify)
    got = await session.get(list(dict.fromkeys(want))) if want else {}
    for oid, expected in verify.items():
        value = got.get(oid)
        if value is None or _kind(value) is not None or value_text(value) != expected:
            raise _StaleMemo()

    # ---- checks
    for position, check in enumerate(spec.checks):
        name = check.label or check.oid
        if check.walk:
            rows = walked[position]
            if not rows:
                out.problems.append(f"{name}: nothing under {check.oid} (no such table or column)")
                continue
            bad = 0
            for suffix, value in rows:
                instance = f"{name}.{_dotted(suffix)}"
                _note_number(out, instance, value)
                problem = judge(check, value)
                if problem:
                    bad += 1
                    out.problems.append(f"{instance} {problem}")
            if not bad:
                out.good.append(f"{name}: {len(rows)} ok")
            continue
        value = got.get(_oid(check.oid))
        missing = "no value" if value is None else _kind(value)
        if missing:
            where = f"{name} ({check.oid})" if check.label else check.oid
            out.problems.append(f"{where}: {missing} on the agent (wrong OID, or not in its view)")
            continue
        _note_number(out, name, value)
        problem = judge(check, value)
        if problem:
            out.problems.append(f"{name} {problem}")
        else:
            out.good.append(f"{name} = {_shown(value_text(value), 30)}")

    # ---- interfaces
    reported: set[int] = set()
    for item, index in if_index.items():
        if index in reported:  # listed twice, e.g. as 1 and as "lo"
            continue
        if index is not None:
            reported.add(index)
        if index is None:
            out.problems.append(f"interface {item!r} not found (no such ifDescr or ifName)")
            continue
        status = got.get((*IF_OPER_STATUS, index))
        descr = got.get((*IF_DESCR, index))
        label = value_text(descr) if descr is not None and _kind(descr) is None else f"ifIndex {index}"
        if isinstance(item, int) and label != f"ifIndex {index}":
            label = f"{label} (ifIndex {index})"
        if status is None or _kind(status) is not None:
            out.problems.append(f"interface {label}: no ifOperStatus.{index} (no such interface)")
            continue
        code = int(status)
        out.values.append((f"interface {label} oper status", float(code)))
        if code == 1:
            out.good.append(f"{label} up")
        else:
            state = OPER_STATUS.get(code, "status")
            out.problems.append(f"interface {label} is {state}({code})")

    # ---- storage
    for entry in spec.storage:
        index = storage_index[entry.descr]
        if index is None:
            out.problems.append(f"storage {entry.descr!r} not found in hrStorage (have: {known})")
            continue
        size, used = got.get((*HR_STORAGE_SIZE, index)), got.get((*HR_STORAGE_USED, index))
        if size is None or used is None or _kind(size) or _kind(used):
            out.problems.append(f"storage {entry.descr}: no hrStorageSize/Used.{index}")
            continue
        if _unsigned32(size) == 0:
            out.problems.append(f"storage {entry.descr}: size 0 (not mounted?)")
            continue
        percent = round(100.0 * _unsigned32(used) / _unsigned32(size), 1)
        out.values.append((f"storage {entry.descr} used %", percent))
        if percent > entry.max_used:
            out.problems.append(f"storage {entry.descr} {percent:g}% used, limit {entry.max_used:g}%")
        else:
            out.good.append(f"{entry.descr} {percent:g}% used")
    return out


def _note_number(out: _Outcome, name: str, value: Any) -> None:
    number = _number(value)
    if number is not None:
        out.values.append((name, number))


def _summary(items: list[str], limit: int = 300) -> str:
    text = "; ".join(items)
    return text if len(text) <= limit else text[: limit - 1] + "…"


async def _address(host: str, port: int) -> tuple[str, int, bool]:
    """(ip, port, is_ipv6); literal addresses skip the resolver."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        family, _, _, _, sockaddr = infos[0]
        return str(sockaddr[0]), port, family == socket.AF_INET6
    return str(ip), port, ip.version == 6


def _tlv(tag: int, body: bytes) -> bytes:
    size = len(body)
    length = (
        bytes([size])
        if size < 0x80
        else bytes([0x80 | ((size.bit_length() + 7) // 8)])
        + size.to_bytes((size.bit_length() + 7) // 8, "big")
    )
    return bytes([tag]) + length + body


def _ber_int(number: int) -> bytes:
    return _tlv(0x02, number.to_bytes(max(1, (number.bit_length() + 8) // 8), "big", signed=True))


def discovery_request(msg_id: int) -> bytes:
    """An SNMPv3 engine-ID discovery request (RFC 3414 4): noAuthNoPriv, no user, no engine ID,
    an empty GET. Every v3-capable agent answers it with a Report, whatever its users and
    communities are, so it tells 'alive' from 'dead' without credentials."""
    header = _tlv(0x30, _ber_int(msg_id) + _ber_int(65507) + _tlv(0x04, b"\x04") + _ber_int(3))
    usm = _tlv(0x30, _tlv(0x04, b"") + _ber_int(0) + _ber_int(0) + _tlv(0x04, b"") * 3)
    pdu = _tlv(0xA0, _ber_int(msg_id) + _ber_int(0) + _ber_int(0) + _tlv(0x30, b""))
    scoped = _tlv(0x30, _tlv(0x04, b"") + _tlv(0x04, b"") + pdu)
    return _tlv(0x30, _ber_int(3) + header + _tlv(0x04, usm) + scoped)


class _Discovery(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not self.outcome.done():
            self.outcome.set_result("alive" if _is_v3_message(data) else "garbage")

    def error_received(self, exc: Exception) -> None:
        # A *connected* UDP socket gets the ICMP port-unreachable as ECONNREFUSED (pysnmp's
        # unconnected socket never does): on a reachable host nothing listens on the port.
        if not self.outcome.done():
            self.outcome.set_result("refused" if isinstance(exc, ConnectionRefusedError) else "silent")


def _is_v3_message(data: bytes) -> bool:
    """Does ``data`` decode completely as an SNMPv3 message (what a discovery answer is)?"""
    from pyasn1.codec.ber import decoder
    from pysnmp.proto.mpmod.rfc3412 import SNMPv3Message

    try:
        message, rest = decoder.decode(data, asn1Spec=SNMPv3Message())
        return not rest and int(message["msgVersion"]) == 3
    except Exception:  # pyasn1 on hostile bytes: whatever it raises, this is no SNMPv3 message
        return False


async def _discover(ip: str, port: int, ipv6: bool, wait: float) -> str:
    """'alive' | 'refused' | 'garbage' | 'silent': what an SNMP agent at ip:port does with a
    credential-free v3 discovery request, within ``wait`` seconds."""
    if wait < 0.01:
        return "silent"
    loop = asyncio.get_running_loop()
    try:
        transport, protocol = await loop.create_datagram_endpoint(
            _Discovery, remote_addr=(ip, port), family=socket.AF_INET6 if ipv6 else socket.AF_INET
        )
    except OSError:
        return "silent"
    try:
        transport.sendto(discovery_request(secrets.randbelow(2**31 - 1)))
        async with asyncio.timeout(wait):
            return await asyncio.shield(protocol.outcome)
    except (TimeoutError, OSError):
        return "silent"
    finally:
        transport.close()


def _silence(spec: SnmpPath, seconds: float, where: str, alive: str) -> ProbeResult:
    """The result when the agent never answered our requests, with what discovery found out."""
    if alive == "refused":
        return ProbeResult.fail(Failure.REFUSED, f"nothing listens on udp {where} (ICMP port unreachable)")
    if alive == "alive" and spec.version == "3":
        return ProbeResult.fail(
            Failure.TIMEOUT,
            f"no answer from {where} within {seconds:g}s although the agent is alive (it answers SNMPv3 "
            "discovery): most likely a wrong priv_key or priv_protocol, which agents cannot detect "
            "and silently drop",
        )
    if alive == "alive":
        return ProbeResult.fail(
            Failure.TIMEOUT,
            f"no answer from {where} within {seconds:g}s although the agent is alive (it answers SNMPv3 "
            "discovery): most likely a wrong community, or the agent does not accept this source address",
        )
    if spec.version == "3":
        why = "agent down or unreachable, or SNMPv3 not enabled there"
    else:
        why = "agent down or unreachable, or the community is wrong: agents silently ignore a wrong community"
    return ProbeResult.fail(Failure.TIMEOUT, f"no SNMP response from {where} within {seconds:g}s ({why})")


def _garbage(stats: _PeerStats, where: str) -> ProbeResult:
    return ProbeResult.fail(
        Failure.PROTOCOL,
        f"{where} answered with {stats.not_snmp} datagram(s) that are not SNMP "
        f"(first bytes: {stats.first_bad.hex(' ') or 'none'}); is this an SNMP agent?",
    )


def _timing(timeout: float) -> tuple[float, int]:
    """pysnmp's per-request timeout and retries within the probe deadline: one retry (a lost
    datagram is the commonest UDP failure) when the budget allows, all done by ~75% of it so that
    pysnmp's own timeout ends a silent probe and leaves time for a discovery request that tells
    'wrong credentials' from 'dead'. pysnmp checks timeouts on a 0.1 s timer tick, so each attempt
    may overrun by that much. Depends on ``timeout`` only: pysnmp caches one target entry per
    distinct (address, timeout, retries)."""
    budget = timeout * 0.75 - 0.2
    if budget >= 0.5:
        return round(budget / 2, 2), 1
    return round(max(timeout * 0.5, 0.05), 2), 0


async def _converse(spec: SnmpPath, session: _Session, stats: _PeerStats, memo: IndexMemo) -> _Outcome:
    """:func:`_run`, cut short as soon as the peer sends something that is not SNMP at all: pysnmp
    would drop it silently and wait for the full timeout."""
    run = asyncio.ensure_future(_run(spec, session, memo))
    garbage = asyncio.ensure_future(stats.bad.wait())
    try:
        await asyncio.wait((run, garbage), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (run, garbage):
            if not task.done():
                task.cancel()
        with suppress(asyncio.CancelledError):
            await garbage
    if not run.done():  # the garbage won the race
        with suppress(asyncio.CancelledError, Exception):
            await run
        raise _Garbage()
    return run.result()


class _Garbage(Exception):
    """The peer answered with datagrams that are not SNMP."""


async def probe(spec: SnmpPath, ctx: ProbeContext) -> ProbeResult:
    port = spec.effective_port
    where = f"[{spec.host}]:{port}" if ":" in spec.host else f"{spec.host}:{port}"
    stats = _PeerStats()
    session: _Session | None = None
    ip, ipv6 = "", False
    started = start = time.perf_counter()
    from pysnmp.error import PySnmpError  # after the first probe this is a dict lookup

    try:
        async with asyncio.timeout(ctx.timeout):
            shared = await _shared_engine(_engine_group(spec))
            hlapi = load_hlapi()  # imported by now
            ip, port, ipv6 = await _address(spec.host, port)
            shared.ensure_transport(ipv6)
            per_request, retries = _timing(ctx.timeout)
            target_class = hlapi.Udp6TransportTarget if ipv6 else hlapi.UdpTransportTarget
            target = await target_class.create((ip, port), timeout=per_request, retries=retries)
            if spec.version == "3":
                auth_key, priv_key = spec.secret("auth_key"), spec.secret("priv_key")
                auth = usm_user(
                    hlapi,
                    spec.username or "",
                    spec.auth_protocol,
                    auth_key.get_secret_value() if auth_key else None,
                    spec.priv_protocol,
                    priv_key.get_secret_value() if priv_key else None,
                )
            else:
                community = spec.secret("community")
                auth = hlapi.CommunityData(
                    community.get_secret_value() if community else "", mpModel=0 if spec.version == "1" else 1
                )
            session = _Session(hlapi, shared, auth, target, v1=spec.version == "1")
            # latency: the conversation itself, not the one-time engine construction
            start = time.perf_counter()
            with shared.watch((ip, port)) as stats:
                memo = ctx.state.setdefault("snmp_index", IndexMemo())
                outcome = await _converse(spec, session, stats, memo)
    except _Garbage:
        return _garbage(stats, where)
    except (TimeoutError, _TimedOut):
        if stats.not_snmp:
            return _garbage(stats, where)
        if not ip:  # the deadline hit before we even knew the address (slow DNS)
            return ProbeResult.fail(Failure.TIMEOUT, f"no SNMP response within {ctx.timeout:g}s (resolving)")
        if session is not None and session.answered:
            return ProbeResult.fail(
                Failure.TIMEOUT,
                f"{where} answered {session.answered} of {session.requests} requests, then nothing "
                f"within {ctx.timeout:g}s: overloaded, a big table walk, or lost datagrams",
            )
        alive = await _discover(ip, port, ipv6, started + ctx.timeout - time.perf_counter())
        if alive == "garbage":
            stats.not_snmp = max(stats.not_snmp, 1)
            return _garbage(stats, where)
        return _silence(spec, ctx.timeout, where, alive)
    except _Failed as exc:
        return ProbeResult.fail(exc.failure, exc.detail, time.perf_counter() - start)
    except socket.gaierror as exc:
        return ProbeResult.fail(Failure.RESOLVE, f"cannot resolve {spec.host}: {exc.strerror or exc}")
    except OSError as exc:
        return ProbeResult.fail(Failure.ERROR, f"{exc.__class__.__name__}: {exc.strerror or exc}")
    except PySnmpError as exc:  # pysnmp's own complaints about the exchange (transport, encoding)
        return ProbeResult.fail(Failure.ERROR, f"SNMP error: {exc}", time.perf_counter() - start)
    latency = time.perf_counter() - start
    values = tuple(outcome.values)
    if outcome.problems:
        return ProbeResult(False, latency, Failure.CONTENT, _summary(outcome.problems), values=values)
    detail = f"{_summary(outcome.good, 200)} ({session.requests} request(s) in {latency * 1000:.1f} ms)"
    return ProbeResult(True, latency, None, detail, values=values)
