"""The configuration: parsed once into frozen pydantic models, validated with messages a person can act on.

Nothing outside this module sees raw YAML dicts. :func:`load_config` either returns a
:class:`Config` or raises :class:`ConfigError` holding one ``place: problem`` line per problem,
where *place* is the key as the admin wrote it (``targets.pve1.paths[2].timeout``).

Inheritance of timings: a path's ``interval``, ``retry_interval``, ``timeout``, ``fail_after`` and
``recover_after`` come from the path, else its target, else ``defaults``. ``timeout`` has one
twist: slow kinds (http, snmp, ipmi, redfish) have a floor (:data:`KIND_TIMEOUT_FLOOR`) that
``defaults.timeout`` does not lower, because the 1 s that suits a ping would make every BMC look
dead; set ``timeout`` on the target or path to go below it.
"""

from __future__ import annotations

import datetime
import difflib
import ipaddress
import os
import re
import ssl
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from watchtower.engine.maintenance import Window, parse_every, zone
from watchtower.hours import WeeklyHours
from watchtower.logs import scrub_query

ROLES = ("network", "hypervisor", "storage", "vm", "service")
Role = Literal["network", "hypervisor", "storage", "vm", "service"]
# The emergency playbook's restore order (phase 3), first to last.
RestoreCategory = Literal["infrastructure", "directory", "storage", "mail", "line-of-business", "secondary"]

PATH_KINDS = ("icmp", "tcp", "http", "dns", "snmp", "ipmi", "redfish", "nut", "trap")
PASSIVE_KINDS = ("trap",)  # fed by what arrives, never probed
DEFAULT_PORTS = {"dns": 53, "snmp": 161, "ipmi": 623, "nut": 3493, "redfish": 443}
KIND_TIMEOUT_FLOOR = {"http": 3.0, "snmp": 2.0, "ipmi": 5.0, "redfish": 5.0, "nut": 2.0}
VANTAGE = (
    "@vantage"  # pseudo target name of the monitor's own connectivity paths; '@' is not a legal target name
)


class ConfigError(Exception):
    """A config that cannot be used. ``problems`` holds one ``place: message`` line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


# --------------------------------------------------------------------------- durations

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
DURATION_HINT = "must be a duration like 2s, 500ms, 15m or 4h"
DURATION_PATTERN = r"^(\d+(\.\d+)?(ms|s|m|h|d))+$"


def parse_duration(value: Any) -> float:
    """``"1h30m"`` -> 5400.0. Bare numbers are refused: is ``timeout: 2`` seconds or minutes?"""
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError(DURATION_HINT)
    text = value.strip().replace(" ", "")
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(DURATION_HINT)
    return total


def format_duration(seconds: float) -> str:
    if seconds < 1 and seconds != 0:
        return f"{round(seconds * 1000)}ms"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be longer than 0s")
    return seconds


Duration = Annotated[
    float,
    BeforeValidator(_positive_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema({"type": "string", "pattern": DURATION_PATTERN, "examples": ["5s"]}),
]


NonNegativeDuration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema({"type": "string", "pattern": DURATION_PATTERN, "examples": ["0s"]}),
]


# --------------------------------------------------------------------------- hosts, ports, files


def _check_host(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be an IP address or a host name")
    host = value.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if re.fullmatch(r"[0-9.]+", host):
        # All digits and dots is no host name anyone has: a typo of an address (10.0.1.333).
        raise ValueError(f"{_short(value)} is not a valid IPv4 address")
    if len(host) > 253 or not re.fullmatch(
        r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?", host
    ):
        raise ValueError(f"{_short(value)} is neither an IP address nor a valid host name")
    return host


Host = Annotated[str, BeforeValidator(_check_host)]
Port = Annotated[int, Field(ge=1, le=65535)]


def _split_host_port(text: str) -> tuple[str, int | None]:
    """``10.0.0.5:443`` / ``[2001:db8::5]:443`` / ``host`` / ``2001:db8::5``."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ValueError(f"cannot read {_short(text)} as [IPv6]:PORT")
        return host, _parse_port(rest[1:]) if rest else None
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, _parse_port(port)
    return text, None


def _parse_port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"port {_short(text)} must be a number from 1 to 65535")
    return int(text)


def _context_dir(info: ValidationInfo) -> Path:
    ctx = info.context or {}
    return Path(ctx.get("config_dir", "."))


def resolve_file(name: str, config_dir: Path) -> Path:
    """Where a ``*_file`` points: absolute as given; relative in $CREDENTIALS_DIRECTORY when that
    holds it (systemd ``LoadCredential=``), else next to the config file."""
    path = Path(name).expanduser()
    if path.is_absolute():
        return path
    creds = os.environ.get("CREDENTIALS_DIRECTORY") or credentials_dir()
    if (Path(creds) / path).is_file():
        return Path(creds) / path
    return config_dir / path


CREDENTIALS_DIR = "/etc/watchtower/credentials"


def credentials_dir() -> str:
    """Where the CLI finds secrets outside the unit (where systemd hands them over in
    $CREDENTIALS_DIRECTORY): the folder the unit's ``LoadCredential=`` lines read from, so
    ``watchtower ack`` works from a root shell. ``$WATCHTOWER_CREDENTIALS`` overrides it."""
    return os.environ.get("WATCHTOWER_CREDENTIALS") or CREDENTIALS_DIR


SECRET_FILE_MAX = 64 * 1024  # a key, a password, a URL, a list of communities
CA_FILE_MAX = 4 * 1024 * 1024  # a CA bundle (Debian's is ~220 KB)


def _short(value: Any, limit: int = 60) -> str:
    """repr of a value for an error message, cut: a config error must stay one short line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]}"


def read_regular_file(path: Path, limit: int) -> str:
    """A regular file's text, at most ``limit`` bytes. Devices (``/dev/zero``), FIFOs (which
    would block), directories and oversized files are errors (ValueError, OSError)."""
    # O_NONBLOCK: opening a FIFO must not wait for a writer; the fstat below then rejects it.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path} is not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path} is larger than {limit // 1024} KiB")
    return data.decode("utf-8")


def _read_file(value: Any, info: ValidationInfo, limit: int = SECRET_FILE_MAX) -> tuple[Path, str]:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a file path")
    path = resolve_file(value.strip(), _context_dir(info))
    try:
        return path, read_regular_file(path, limit)
    except FileNotFoundError:
        creds = "$CREDENTIALS_DIRECTORY" if os.environ.get("CREDENTIALS_DIRECTORY") else credentials_dir()
        where = f" (looked in {creds} and {path.parent})" if not Path(value).is_absolute() else ""
        raise ValueError(f"file not found: {value}{where}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc.__class__.__name__}") from None


@dataclass(frozen=True, slots=True)
class FileSecret:
    """A secret read from a ``*_file``. The path may be shown; the value never is."""

    path: str
    value: SecretStr

    def __repr__(self) -> str:
        return f"FileSecret({self.path!r})"


def _load_secret_file(value: Any, info: ValidationInfo, *, lines: bool = False) -> FileSecret:
    if isinstance(value, FileSecret):
        return value
    path, text = _read_file(value, info)
    secret = text.strip()
    if not secret:
        raise ValueError(f"file {path} is empty")
    if not lines and ("\n" in secret or "\r" in secret):
        # A key or password is one line; more is the wrong file (seen: /etc/shadow as a community).
        raise ValueError(f"file {path} holds more than one line; a secret file holds the secret only")
    return FileSecret(str(path), SecretStr(secret))


def _load_secret_lines_file(value: Any, info: ValidationInfo) -> FileSecret:
    return _load_secret_file(value, info, lines=True)


SecretFile = Annotated[
    FileSecret,
    BeforeValidator(_load_secret_file),
    PlainSerializer(lambda s: s.path, return_type=str),
    WithJsonSchema({"type": "string", "description": "path of a file holding the secret"}),
]

SecretLinesFile = Annotated[
    FileSecret,
    BeforeValidator(_load_secret_lines_file),
    PlainSerializer(lambda s: s.path, return_type=str),
    WithJsonSchema({"type": "string", "description": "path of a file holding one secret a line"}),
]


def _load_ca_file(value: Any, info: ValidationInfo) -> str:
    if isinstance(value, Path):
        value = str(value)
    path, _ = _read_file(value, info, CA_FILE_MAX)
    try:
        ssl.create_default_context(cafile=str(path))
    except (ssl.SSLError, ValueError) as exc:
        raise ValueError(f"{path} holds no usable PEM certificate ({exc})") from None
    return str(path)


CaFile = Annotated[str, BeforeValidator(_load_ca_file)]


def _check_oid(value: Any) -> str:
    text = str(value).strip().lstrip(".")
    if not re.fullmatch(r"\d+(\.\d+)+", text):
        raise ValueError(f"{_short(value)} is not a numeric OID like 1.3.6.1.2.1.1.3.0")
    return text


Oid = Annotated[str, BeforeValidator(_check_oid)]


def _pick_secret(model: BaseModel, name: str) -> SecretStr | None:
    inline = getattr(model, name, None)
    from_file: FileSecret | None = getattr(model, f"{name}_file", None)
    return from_file.value if from_file is not None else inline


class Strict(BaseModel):
    """Frozen, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Inline secret fields that may be given as NAME or NAME_file; both at once is a mistake.
    _secret_fields: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _one_of_secret_or_file(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            for name in cls._secret_fields:
                if data.get(name) is not None and data.get(f"{name}_file") is not None:
                    raise ValueError(f"give either {name} or {name}_file, not both")
        return data

    def secret(self, name: str) -> SecretStr | None:
        """The secret ``name``, from the inline key or its ``*_file``."""
        return _pick_secret(self, name)


# --------------------------------------------------------------------------- timings


class Timing(Strict):
    """Timing overrides; ``None`` means inherit from the target, then ``defaults``."""

    interval: Duration | None = Field(None, description="probe cadence while healthy")
    retry_interval: Duration | None = Field(
        None, description="cadence while the path is failing (or recovering) but not yet settled"
    )
    timeout: Duration | None = Field(None, description="hard bound on one probe")
    fail_after: int | None = Field(None, ge=1, le=100, description="consecutive failures before down")
    recover_after: int | None = Field(None, ge=1, le=100, description="consecutive successes before up")


class Defaults(Strict):
    interval: Duration = Field(5.0, description="probe cadence while healthy")
    retry_interval: Duration = Field(
        1.0, description="cadence while a path is failing (or recovering) but not settled"
    )
    timeout: Duration = Field(1.0, description="hard bound on one probe (slow kinds have a higher floor)")
    fail_after: int = Field(2, ge=1, le=100, description="consecutive failures before a path is down")
    recover_after: int = Field(2, ge=1, le=100, description="consecutive successes before a path is up again")
    confirm_paths: int = Field(
        2, ge=1, le=10, description="independent paths that must be down before the target is down"
    )


# --------------------------------------------------------------------------- path kinds


class PathBase(Timing):
    kind: str
    name: str | None = Field(None, description="label in metrics and the API; defaults to 'KIND HOST[:PORT]'")
    critical: bool = Field(
        False,
        description="this path alone is the service: when it is down the target is down (and pages), "
        "even while its other paths answer; otherwise such a target is only degraded",
    )
    network: str | None = Field(
        None,
        description="the `networks:` entry this path crosses; by default the one whose cidr holds its "
        "address (needed for host names, which are not resolved for this)",
    )

    def default_name(self) -> str:
        raise NotImplementedError

    @property
    def display_name(self) -> str:
        return self.name or self.default_name()

    @property
    def address(self) -> str:
        """What the path talks to, for 'paths of one kind to one address count once'."""
        return self.default_name()


def _host_port_name(kind: str, host: str, port: int | None) -> str:
    if port is None:
        return f"{kind} {host}"
    shown = f"[{host}]" if ":" in host else host
    return f"{kind} {shown}:{port}"


class HostPath(PathBase):
    host: Host
    port: Port | None = None

    def default_name(self) -> str:
        return _host_port_name(self.kind, self.host, self.port)

    @property
    def effective_port(self) -> int:
        return self.port or DEFAULT_PORTS[self.kind]


class IcmpPath(HostPath):
    """ICMP echo to one address."""

    kind: Literal["icmp"] = "icmp"
    count: int = Field(1, ge=1, le=10, description="echo requests per probe; up when any is answered")

    @model_validator(mode="after")
    def _no_port(self) -> IcmpPath:
        if self.port is not None:
            raise ValueError("icmp has no port")
        return self


class TcpPath(HostPath):
    """TCP connect to HOST:PORT."""

    kind: Literal["tcp"] = "tcp"
    port: Port


class HttpPath(PathBase):
    """HTTP(S) request with expected status and optional content check."""

    kind: Literal["http"] = "http"
    _secret_fields = ("password",)
    url: str
    method: Literal["GET", "HEAD", "POST"] = "GET"
    expect_status: Annotated[
        list[int],
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "integer", "minimum": 100, "maximum": 599},
                    {"type": "array", "items": {"type": "integer", "minimum": 100, "maximum": 599}},
                ]
            }
        ),
    ] = Field(default_factory=lambda: [200], description="status code(s) that count as up")
    expect_body: str | None = Field(None, description="substring the body must contain")
    expect_regex: str | None = Field(None, description="regular expression the body must match")
    headers: dict[str, str] = Field(default_factory=dict)
    username: str | None = None
    password: SecretStr | None = None
    password_file: SecretFile | None = None
    ca_file: CaFile | None = Field(
        None, description="PEM bundle to verify the server (self-signed BMC/PVE certs)"
    )
    insecure: bool = Field(False, description="skip TLS verification (explicit opt-out)")
    follow_redirects: bool = False
    max_body: int = Field(1_048_576, ge=0, le=64 * 1_048_576, description="bytes of body read at most")
    tls_warn_days: float = Field(
        14,
        ge=0,
        description="https: a `certificate` warning when the server's certificate expires within this "
        "many days (0: never)",
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{_short(value)} must be an http:// or https:// URL with a host")
        if parts.password:
            raise ValueError(
                "put credentials in username/password_file, not in the URL (it is shown in labels)"
            )
        return value

    @field_validator("expect_status", mode="before")
    @classmethod
    def _status_list(cls, value: Any) -> Any:
        values = value if isinstance(value, list) else [value]
        for code in values:
            if not isinstance(code, int) or isinstance(code, bool) or not 100 <= code <= 599:
                raise ValueError(f"{_short(code)} is not an HTTP status code (100-599)")
        return values

    @field_validator("expect_regex")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"invalid regular expression: {exc}") from None
        return value

    @model_validator(mode="after")
    def _tls(self) -> HttpPath:
        if self.insecure and self.ca_file:
            raise ValueError("give either ca_file or insecure: true, not both")
        return self

    def default_name(self) -> str:
        # The name is a metric label and shows in the API and the log: query values (where
        # many APIs take a key, ?api_key=...) are masked in it.
        return f"http {scrub_query(self.url)}"

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""


DNS_TYPES = ("A", "AAAA", "CNAME", "MX", "NS", "PTR", "SOA", "SRV", "TXT", "ANY")


class DnsPath(PathBase):
    """A query for ``query`` sent to ``server``; optionally an answer that must be present."""

    kind: Literal["dns"] = "dns"
    server: Host
    port: Port | None = None
    query: str
    type: Literal["A", "AAAA", "CNAME", "MX", "NS", "PTR", "SOA", "SRV", "TXT", "ANY"] = "A"
    expect: list[str] = Field(default_factory=list, description="values that must all be in the answer")
    transport: Literal["udp", "tcp"] = "udp"

    @field_validator("type", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    def default_name(self) -> str:
        return _host_port_name("dns", self.server, self.port)

    @property
    def host(self) -> str:
        return self.server


class SnmpCheck(Strict):
    """One OID and what its value must be. Without a condition any value holds."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    oid: Oid = Field(description="numeric OID, e.g. 1.3.6.1.4.1.6574.3.1.1.3.0 (Synology RAID status)")
    equals: str | int | float | None = Field(None, description="the value must be exactly this")
    in_: list[str | int | float] | None = Field(
        None, alias="in", description="the value must be one of these, e.g. `[1]` for 'status OK'"
    )
    min: float | None = Field(None, description="numeric value at least this")
    max: float | None = Field(None, description="numeric value at most this")
    regex: str | None = Field(None, description="the value as text must match (re.search)")
    label: str | None = Field(
        None, description="name of the reading in details and metrics; default: the OID"
    )
    walk: bool = Field(
        False,
        description="treat `oid` as a table column: every instance under it must pass "
        "(e.g. the status of every RAID array); an empty column fails",
    )

    @model_validator(mode="after")
    def _one_condition(self) -> SnmpCheck:
        given = [k for k in ("equals", "in_", "regex") if getattr(self, k) is not None]
        if self.min is not None or self.max is not None:
            given.append("min/max")
        if len(given) > 1:
            raise ValueError("use at most one of equals, in, min/max, regex")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"invalid regular expression: {exc}") from None
        return self


class SnmpStorage(Strict):
    """One HOST-RESOURCES-MIB hrStorage entry (a file system, RAM, swap) and its use limit."""

    descr: str = Field(min_length=1, description="hrStorageDescr exactly, e.g. `/`, `/volume1`, `Swap space`")
    max_used: float = Field(90.0, ge=0, le=100, description="highest allowed hrStorageUsed/hrStorageSize, %")


class SnmpPath(HostPath):
    """SNMP (v1, v2c, v3): OID checks, interface oper status, storage use; see watchtower.probes.snmp."""

    kind: Literal["snmp"] = "snmp"
    _secret_fields = ("community", "auth_key", "priv_key")
    version: Literal["1", "2c", "3"] = "2c"
    community: SecretStr | None = None
    community_file: SecretFile | None = None
    username: str | None = None
    auth_protocol: Literal["MD5", "SHA", "SHA224", "SHA256", "SHA384", "SHA512"] = "SHA"
    auth_key: SecretStr | None = None
    auth_key_file: SecretFile | None = None
    priv_protocol: Literal["DES", "AES", "AES192", "AES256", "AES192C", "AES256C"] = Field(
        "AES",
        description="AES192/AES256: key extension as in net-snmp (Blumenthal); "
        "AES192C/AES256C: Cisco style (Reeder)",
    )
    priv_key: SecretStr | None = None
    priv_key_file: SecretFile | None = None
    checks: list[SnmpCheck] = Field(
        default_factory=lambda: [SnmpCheck(oid="1.3.6.1.2.1.1.3.0", label="sysUpTime")],
        description="every check must hold for the path to be up; default: sysUpTime answers",
    )
    interfaces: list[int | str] = Field(
        default_factory=list,
        description="interfaces that must be oper-up (IF-MIB ifOperStatus = up(1)): "
        "ifIndex numbers or names (ifDescr, else ifName), e.g. `[1, eth0]`",
    )
    storage: list[SnmpStorage] = Field(
        default_factory=list,
        description="HOST-RESOURCES-MIB hrStorage entries and their highest allowed use in %, "
        "e.g. `[{descr: /, max_used: 90}]`; the use is also reported as a metric",
    )

    @field_validator("version", mode="before")
    @classmethod
    def _version_str(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) else value

    @model_validator(mode="after")
    def _credentials(self) -> SnmpPath:
        if self.version == "3":
            if not self.username:
                raise ValueError("SNMP v3 needs username (and auth_key/priv_key or their *_file)")
            if self.secret("priv_key") is not None and self.secret("auth_key") is None:
                raise ValueError("SNMP v3 priv_key needs auth_key too (there is no noAuthPriv level)")
        elif self.secret("community") is None:
            raise ValueError(f"SNMP v{self.version} needs community or community_file")
        for item in self.interfaces:
            if (isinstance(item, int) and item < 1) or (isinstance(item, str) and not item.strip()):
                raise ValueError(f"interfaces: {_short(item)} is neither an ifIndex (1, 2, ...) nor a name")
        return self


class TrapUser(Strict):
    """An SNMPv3 user whose traps and informs the receiver accepts (authNoPriv or authPriv)."""

    _secret_fields = ("auth_key", "priv_key")
    username: str = Field(min_length=1, description="the USM user name the devices send as")
    auth_protocol: Literal["MD5", "SHA", "SHA224", "SHA256", "SHA384", "SHA512"] = "SHA"
    auth_key: SecretStr | None = Field(None, description="authentication passphrase (required)")
    auth_key_file: SecretFile | None = None
    priv_protocol: Literal["DES", "AES", "AES192", "AES256", "AES192C", "AES256C"] = Field(
        "AES", description="as for snmp paths: AES192/AES256 net-snmp style, AES192C/AES256C Cisco style"
    )
    priv_key: SecretStr | None = Field(None, description="privacy passphrase; without it: authNoPriv")
    priv_key_file: SecretFile | None = None
    engine_ids: list[str] = Field(
        default_factory=list,
        description="snmpEngineID (hex) of each device sending v3 *traps* as this user: a trap's keys "
        "are localized to the sender's engine ID. Informs need none (the sender learns ours).",
    )

    @field_validator("engine_ids", mode="before")
    @classmethod
    def _hex_ids(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        out = []
        for item in value:
            text = str(item).strip().lower().removeprefix("0x").replace(":", "")
            if not re.fullmatch(r"([0-9a-f]{2}){5,32}", text):
                raise ValueError(
                    f"{_short(item)} is not an snmpEngineID in hex (5 to 32 bytes, e.g. 0x80001f88...)"
                )
            out.append(text)
        return out

    @model_validator(mode="after")
    def _keys(self) -> TrapUser:
        if self.secret("auth_key") is None:
            raise ValueError(f"trap user {self.username}: needs auth_key or auth_key_file")
        return self


class TrapListener(Strict):
    """The SNMP trap/inform receiver: where it listens and whom it believes."""

    _secret_fields = ("communities",)
    listen: str = Field("0.0.0.0:162", description="HOST:PORT; port 162 needs root or CAP_NET_BIND_SERVICE")
    communities: list[SecretStr] = Field(default_factory=list, description="accepted v1/v2c communities")
    communities_file: SecretLinesFile | None = Field(
        None, description="file with one accepted community per line"
    )
    users: list[TrapUser] = Field(default_factory=list, description="accepted SNMPv3 users")

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        host, port = _split_host_port(value)
        if port is None:
            raise ValueError("must be HOST:PORT like 0.0.0.0:162 or [::]:162")
        _check_host(host)
        return value.strip()

    @property
    def host_port(self) -> tuple[str, int]:
        host, port = _split_host_port(self.listen)
        return host, port or 162

    def community_list(self) -> list[SecretStr]:
        """Accepted communities, inline or from the file (blank lines and # comments skipped)."""
        found = list(self.communities)
        if self.communities_file is not None:
            for line in self.communities_file.value.get_secret_value().splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    found.append(SecretStr(line.strip()))
        return found

    @model_validator(mode="after")
    def _someone(self) -> TrapListener:
        if not self.community_list() and not self.users:
            raise ValueError("a trap listener needs communities, communities_file or users")
        return self


class IpmiSpec(HostPath):
    """IPMI over LAN to a BMC."""

    kind: Literal["ipmi"] = "ipmi"
    _secret_fields = ("password",)
    username: str
    password: SecretStr | None = None
    password_file: SecretFile | None = None
    interface: Literal["lanplus", "lan"] = "lanplus"
    cipher_suite: int = Field(3, ge=0, le=17)
    privilege: Literal["user", "operator", "administrator"] = Field(
        "user", description="session privilege level (ipmitool -L); every read needs only user"
    )
    sel: bool = Field(True, description="report new System Event Log records (read incrementally by id)")
    sensors: bool = Field(True, description="read sensor states (ipmitool sdr elist)")
    sensors_every: int = Field(
        1, ge=1, le=1000, description="read sensors on every Nth run only; a power-off run always reads them"
    )

    @model_validator(mode="after")
    def _password(self) -> IpmiSpec:
        if self.secret("password") is None:
            raise ValueError("IPMI needs password or password_file")
        return self


class RedfishSpec(HostPath):
    """Redfish (HTTPS REST) to a BMC."""

    kind: Literal["redfish"] = "redfish"
    _secret_fields = ("password",)
    username: str
    password: SecretStr | None = None
    password_file: SecretFile | None = None
    auth: Literal["session", "basic"] = "session"
    ca_file: CaFile | None = None
    insecure: bool = False

    @model_validator(mode="after")
    def _password(self) -> RedfishSpec:
        if self.secret("password") is None:
            raise ValueError("Redfish needs password or password_file")
        if self.insecure and self.ca_file:
            raise ValueError("give either ca_file or insecure: true, not both")
        return self


class NutPath(HostPath):
    """A UPS through a NUT server (upsd)."""

    kind: Literal["nut"] = "nut"
    _secret_fields = ("password",)
    ups: str
    username: str | None = None
    password: SecretStr | None = None
    password_file: SecretFile | None = None


class TrapRule(Strict):
    """What a configured trap OID means for the target."""

    oid: Oid = Field(description="snmpTrapOID of the trap")
    text: str | None = Field(None, description="what to call it on the timeline (default: the OID)")
    down: bool = Field(False, description="the trap path goes down when it arrives")
    clear_oid: Oid | None = Field(None, description="a trap that brings the path back up")
    hold: Duration = Field(600.0, description="without a clearing trap, the path comes back up after this")


class TrapPath(PathBase):
    """Passive: traps from ``source``. linkDown/linkUp for the listed interfaces set the path's
    state; configured trap OIDs become timeline events and may hold the path down."""

    kind: Literal["trap"] = "trap"
    source: Host = Field(description="the address the device sends its traps from")
    interfaces: list[int | str] = Field(
        default_factory=list, description="ifIndex numbers or ifDescr names whose linkDown/linkUp count"
    )
    events: list[TrapRule] = Field(default_factory=list, description="trap OIDs worth a timeline entry")

    def default_name(self) -> str:
        return f"trap {self.source}"

    @property
    def host(self) -> str:
        return self.source


PathSpec = IcmpPath | TcpPath | HttpPath | DnsPath | SnmpPath | IpmiSpec | RedfishSpec | NutPath | TrapPath
_URL_KINDS = {"http": "url"}


def _normalize_path_item(value: Any) -> Any:
    """Short and long YAML forms (`icmp: ADDR`, `tcp: HOST:PORT`, `KIND: {...}`) -> `{kind: KIND, ...}`."""
    if isinstance(value, BaseModel):
        return value
    if not isinstance(value, Mapping) or len(value) != 1:
        got = f"keys {', '.join(map(str, value))}" if isinstance(value, Mapping) else type(value).__name__
        raise ValueError(
            f"each path is one mapping KIND: SPEC with KIND one of {', '.join(PATH_KINDS)} (got {got})"
        )
    ((kind, spec),) = value.items()
    if kind not in PATH_KINDS:
        raise ValueError(f"unknown path kind {_short(kind)}{_did_you_mean(str(kind), PATH_KINDS)}")
    if isinstance(spec, str):
        if kind == "trap":
            return {"kind": kind, "source": spec}
        if kind in _URL_KINDS:
            return {"kind": kind, _URL_KINDS[kind]: spec}
        host, port = _split_host_port(spec)
        if kind == "tcp" and port is None:
            raise ValueError(f"tcp short form is HOST:PORT, like 10.0.0.5:443 (got {_short(spec)})")
        return {"kind": kind, "host": host} | ({"port": port} if port is not None else {})
    if not isinstance(spec, Mapping):
        raise ValueError(f"{kind} takes an address or a mapping of settings")
    if "kind" in spec:
        raise ValueError(f"{kind}.kind: unknown key")
    return {"kind": kind, **spec}


PathItem = Annotated[PathSpec, Field(discriminator="kind"), BeforeValidator(_normalize_path_item)]


class Bmc(Strict):
    """The out-of-band controller of a host; consulted to explain why it is down."""

    ipmi: IpmiSpec | None = None
    redfish: RedfishSpec | None = None

    @field_validator("ipmi", "redfish", mode="before")
    @classmethod
    def _kind(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, Mapping):
            return {"kind": info.field_name, **value}
        return value

    @model_validator(mode="after")
    def _some(self) -> Bmc:
        if self.ipmi is None and self.redfish is None:
            raise ValueError("bmc needs ipmi or redfish")
        return self


# --------------------------------------------------------------------------- backups (issue 16)


class ResticSource(Strict):
    """A restic repository, read with ``restic snapshots --json --no-lock`` (works read-only)."""

    kind: Literal["restic"] = "restic"
    repository: str = Field(description="path or URL as restic takes it (`-r`)")
    password_file: SecretFile = Field(description="file holding the repository password")
    host: str | None = Field(None, description="only snapshots of this host (`--host`)")
    tag: str | None = Field(None, description="only snapshots with this tag (`--tag`)")
    binary: str = Field("restic", description="the restic program")


class BorgSource(Strict):
    """A borg repository, read with ``borg list --json --bypass-lock`` (works read-only)."""

    kind: Literal["borg"] = "borg"
    repository: str = Field(description="path or ssh:// URL as borg takes it")
    passphrase_file: SecretFile | None = Field(None, description="file holding the passphrase")
    prefix: str | None = Field(None, description="only archives whose name starts with this")
    timezone: str = Field(
        "UTC",
        description="zone of the machine that makes the archives: borg 1.2 lists `start` as local "
        "time without a zone",
    )
    binary: str = Field("borg", description="the borg program")

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        WeeklyHours.parse("always", value)  # raises with a readable message
        return value


class PbsSource(Strict):
    """Proxmox Backup Server: one backup group's snapshots, with a read-only API token."""

    _secret_fields = ("token_secret",)
    kind: Literal["pbs"] = "pbs"
    url: str = Field(description="base URL, e.g. `https://pbs.example:8007`")
    datastore: str
    backup_type: Literal["vm", "ct", "host"] = "vm"
    backup_id: str = Field(description="the guest's id (VMID) or host name")
    namespace: str | None = Field(None, description="datastore namespace (`ns`)")
    token_id: str = Field(description="`USER@REALM!TOKENID` (DatastoreAudit suffices)")
    token_secret: SecretStr | None = None
    token_secret_file: SecretFile | None = Field(None, description="file holding the token's secret")
    ca_file: CaFile | None = None
    insecure: bool = False

    @model_validator(mode="after")
    def _token(self) -> PbsSource:
        if self.secret("token_secret") is None:
            raise ValueError("pbs needs token_secret or token_secret_file")
        if not re.fullmatch(r"[^@!\s]+@[^@!\s]+![^@!\s]+", self.token_id):
            raise ValueError(f"token_id {self.token_id!r} must look like USER@REALM!TOKENID")
        return self


class PveSource(Strict):
    """Proxmox VE: a guest's backups on one storage, its failed backup jobs, and whether any job
    covers it at all, with a read-only API token (PVEAuditor)."""

    _secret_fields = ("token_secret",)
    kind: Literal["pve"] = "pve"
    url: str = Field(description="base URL, e.g. `https://pve1.example:8006`")
    node: str = Field(description="the node whose storage holds the backups")
    storage: str = Field(description="the backup storage (vzdump dir, NFS, or a PBS storage)")
    vmid: int = Field(ge=100, description="the guest")
    token_id: str = Field(description="`USER@REALM!TOKENID`")
    token_secret: SecretStr | None = None
    token_secret_file: SecretFile | None = Field(None, description="file holding the token's secret")
    ca_file: CaFile | None = None
    insecure: bool = False

    @model_validator(mode="after")
    def _token(self) -> PveSource:
        if self.secret("token_secret") is None:
            raise ValueError("pve needs token_secret or token_secret_file")
        if not re.fullmatch(r"[^@!\s]+@[^@!\s]+![^@!\s]+", self.token_id):
            raise ValueError(f"token_id {self.token_id!r} must look like USER@REALM!TOKENID")
        return self


class TruenasSource(Strict):
    """TrueNAS 25.04+: a periodic snapshot or replication task's last run, over JSON-RPC."""

    _secret_fields = ("api_key",)
    kind: Literal["truenas"] = "truenas"
    url: str = Field(description="`wss://HOST/api/current`")
    task: Literal["snapshot", "replication"] = Field(description="which kind of task")
    id: int = Field(ge=1, description="the task's id (Data Protection in the web UI)")
    api_key: SecretStr | None = None
    api_key_file: SecretFile | None = Field(None, description="file holding a read-only API key")
    ca_file: CaFile | None = None
    insecure: bool = False

    @field_validator("url")
    @classmethod
    def _ws(cls, value: str) -> str:
        if urlsplit(value).scheme not in ("ws", "wss") or not urlsplit(value).hostname:
            raise ValueError(f"{value!r} must be a wss:// URL, e.g. wss://nas.example/api/current")
        return value

    @model_validator(mode="after")
    def _key(self) -> TruenasSource:
        if self.secret("api_key") is None:
            raise ValueError("truenas needs api_key or api_key_file")
        return self


class PushSource(Strict):
    """The backup job reports itself: ``curl -X POST -H 'Authorization: Bearer TOKEN'
    .../api/v1/backups/NAME`` at its end (``.../NAME/fail`` when it failed)."""

    _secret_fields = ("token",)
    kind: Literal["push"] = "push"
    token: SecretStr | None = None
    token_file: SecretFile | None = Field(None, description="file holding this backup's push token")

    @model_validator(mode="after")
    def _token(self) -> PushSource:
        if self.secret("token") is None:
            raise ValueError("push needs token or token_file")
        return self


BackupSpec = ResticSource | BorgSource | PbsSource | PveSource | TruenasSource | PushSource
BACKUP_KINDS = ("restic", "borg", "pbs", "pve", "truenas", "push")


class Backup(Strict):
    """Where a service's restore points are, and how fresh they must be."""

    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$",
        description="unique on the site; the push URL's NAME (default TARGET-KIND)",
    )
    restic: ResticSource | None = None
    borg: BorgSource | None = None
    pbs: PbsSource | None = None
    pve: PveSource | None = None
    truenas: TruenasSource | None = None
    push: PushSource | None = None
    max_age: Duration | None = Field(None, description="newest restore point at most this old (default: rpo)")
    verified_within: Duration | None = Field(
        None, description="newest verified restore point at most this old (sources that verify)"
    )
    min_count: int | None = Field(None, ge=1, description="at least this many restore points")
    interval: Duration = Field(900.0, description="how often the source is read")
    timeout: Duration = Field(60.0, description="bound on one read (the subprocess is killed after it)")
    kept_at: str | None = Field(
        None, description="where the backup and its passphrase are kept (a location, never the secret)"
    )

    @model_validator(mode="after")
    def _one_source(self) -> Backup:
        given = [k for k in BACKUP_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"each backup needs exactly one of {', '.join(BACKUP_KINDS)} (got {len(given)})")
        return self

    @property
    def source(self) -> BackupSpec:
        spec = self.restic or self.borg or self.pbs or self.pve or self.truenas or self.push
        assert spec is not None
        return spec


class RestoreTest(Strict):
    date: datetime.date = Field(description="when the restore was tried (YYYY-MM-DD)")
    duration: Duration | None = Field(None, description="how long it took, to hold against the RTO")
    result: Literal["ok", "failed", "partial"] = "ok"
    note: str | None = None


@dataclass(frozen=True, slots=True)
class ResolvedBackup:
    name: str
    target: str
    service: str
    spec: Backup
    max_age: float | None  # the backup's max_age, else its service's rpo


class Service(Strict):
    """The business service a target carries, for RTO clocks and the restore board."""

    name: str = Field(description="as the business calls it: ERP, Mail, File server")
    rto: Duration | None = Field(None, description="recovery time objective")
    rpo: Duration | None = Field(None, description="recovery point objective")
    restore_order: int | None = Field(None, ge=0, description="lower comes back first")
    category: RestoreCategory | None = Field(
        None,
        description=(
            "its step in the playbook's restore order (infrastructure, directory, storage, mail, "
            "line-of-business, secondary), used after restore_order; guessed from the role and the "
            "names when not set"
        ),
    )
    backups: list[Backup] = Field(
        default_factory=list, description="its restore points: restic, borg, pbs or push (issue 16)"
    )
    restore_tests: list[RestoreTest] = Field(
        default_factory=list, description="restore tests done (`watchtower restore-test record` adds one)"
    )
    owner: str | None = Field(None, description="who restores it (name and phone), for the plan")


TargetName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")]


NetworkName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")]


class Network(Strict):
    """One network of the site (production, management, storage...): its address ranges and the
    devices that carry it. A path on it depends on those devices; its paths failing together while
    other networks still reach the same hosts is one network incident, not one per host."""

    cidr: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = Field(
        min_length=1, description="its address ranges; a path is placed on the most specific match"
    )
    via: list[str] = Field(
        default_factory=list,
        description="the targets that carry it (core switch first, then what is behind it); the "
        "first names its incidents",
    )
    label: str | None = Field(
        None, max_length=40, description="how alerts call it, e.g. `production` (default: its name)"
    )

    @field_validator("cidr", mode="before")
    @classmethod
    def _cidr_list(cls, value: Any) -> Any:
        values = value if isinstance(value, list) else [value]
        out = []
        for v in values:
            try:
                out.append(ipaddress.ip_network(str(v), strict=False))
            except ValueError:
                raise ValueError(f"{v!r} is not an address range like 10.0.1.0/24") from None
        return out


class Target(Timing):
    role: Role = Field(description="what it is; decides the incident scope when it fails")
    paths: list[PathItem] = Field(min_length=1, description="independent ways to check it (see Path kinds)")
    depends_on: list[str] = Field(default_factory=list, description="targets it needs (e.g. its switch)")
    runs_on: str | None = Field(None, description="the hypervisor target this VM runs on")
    storage: list[str] = Field(default_factory=list, description="storage targets its disks live on")
    confirm_paths: int | None = Field(None, ge=1, le=10, description="overrides defaults.confirm_paths")
    bmc: Bmc | None = Field(None, description="its out-of-band controller (IPMI or Redfish)")
    service: Service | None = Field(
        None, description="the business service it carries (RTO clock, restore order)"
    )
    description: str | None = Field(None, description="free text shown with its incidents")
    service_tag: str | None = Field(
        None, description="vendor service tag / serial, quoted in hardware alerts"
    )
    vendor_contact: str | None = Field(None, description="how to open a vendor case")
    provider: str | None = Field(
        None, description="the `providers:` entry to call when it fails (its ISP line, its vendor)"
    )
    runbook: str | None = Field(None, description="link or text shown with incidents of this target")
    warranty_until: datetime.date | None = Field(
        None, description="end of the vendor warranty/support contract (readiness warns 90 days ahead)"
    )


# --------------------------------------------------------------------------- notify, heartbeat


class Channel(Strict):
    _secret_fields = ("url",)
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="shown in metrics and reports")
    url: SecretStr | None = Field(None, description="apprise URL (holds credentials: prefer url_file)")
    url_file: SecretFile | None = Field(None, description="file holding the apprise URL")
    tags: list[str] = Field(default_factory=list, description="escalation steps address channels by tag")
    format: Literal["auto", "long", "sms"] = Field(
        "auto",
        description="message style: sms = one 160-character segment; auto = sms for SMS gateways "
        "(smseagle, twilio, ...), long otherwise",
    )

    @model_validator(mode="after")
    def _url(self) -> Channel:
        if self.secret("url") is None:
            raise ValueError("a channel needs url or url_file")
        return self


def _check_windows(value: Any) -> Any:
    if isinstance(value, str):
        from watchtower.availability import parse_windows

        parse_windows(value)
    return value


def _check_zone(value: Any) -> Any:
    if isinstance(value, str):
        from watchtower.availability import zone

        zone(value)
    return value


Availability = Annotated[str, BeforeValidator(_check_windows)]
TimeZone = Annotated[str, BeforeValidator(_check_zone)]
# What a step's ``when.cause`` can name: the BMC's causes, and the two the playbook reasons about.
STEP_CAUSES = ("security", "hardware", "power_off", "hardware_fault", "os_unresponsive", "bmc_unreachable")


class Contact(Strict):
    """A person in the escalation chain: how to reach them and when."""

    name: str | None = Field(None, description="as people call them (defaults to the key)")
    role: str | None = Field(None, description="e.g. admin, on-call, management, insurer")
    phone: str | None = Field(None, description="shown on the page and in drills: who to call by hand")
    channels: list[str] = Field(
        min_length=1, description="names (or tags) of notify.channels that reach this person"
    )
    available: Availability = Field(
        "always",
        description="weekly windows in `timezone`, like `Mon-Fri 07:00-19:00; Sat 09:00-12:00` "
        "(an end before the start runs past midnight), `always`, or `never` (on leave)",
    )
    timezone: TimeZone = Field("UTC", description="IANA zone of `available` (Europe/Berlin)")
    on_call: bool = Field(
        False,
        description="reached out of hours: when none of the other contacts a step names is available",
    )
    verify_every: Duration = Field(
        90 * 86400.0, description="a drill should have reached this person at least this often"
    )


class StepWhen(Strict):
    """A step that fires only for some incidents (both lists, when given, must match)."""

    scope: list[Literal["network", "hypervisor", "storage", "vm", "service"]] = Field(
        default_factory=list, description="incident scopes this step is for"
    )
    cause: list[Literal[STEP_CAUSES]] = Field(  # type: ignore[valid-type]
        default_factory=list,
        description="`security` (several unrelated services at once), `hardware` (storage, or the "
        "BMC reports a fault or power off), or a BMC cause",
    )


class EscalationStep(Strict):
    after: NonNegativeDuration | None = Field(
        None, description="delay after the incident opened; 0s = at once"
    )
    rto_fraction: float | None = Field(
        None, gt=0, le=1, description="fires at this fraction of the smallest RTO"
    )
    notify: list[str] = Field(default_factory=list, description="channel tags (or names) to notify")
    contacts: list[str] = Field(
        default_factory=list,
        description="contacts to reach: those available at that moment (else the on-call ones); "
        "nobody available -> the next step fires at once",
    )
    when: StepWhen | None = Field(None, description="only for incidents of these scopes/causes")
    unless: Literal["acknowledged"] | None = None

    @model_validator(mode="after")
    def _trigger(self) -> EscalationStep:
        if (self.after is None) == (self.rto_fraction is None):
            raise ValueError("each step needs exactly one of after or rto_fraction")
        if not self.notify and not self.contacts:
            raise ValueError("each step needs notify (channel tags) or contacts")
        return self


class PlanDistribution(Strict):
    every: Duration = Field(30 * 86400.0, description="send a fresh copy this often")
    notify: list[str] = Field(min_length=1, description="channel tags or names (those taking attachments)")


class Plan(Strict):
    """The recovery plan on the phones: `watchtower plan export`, and a copy sent regularly."""

    format: Literal["pdf", "html"] = Field("pdf", description="the attachment's format (pdf needs chromium)")
    distribute: PlanDistribution | None = Field(
        None,
        description="send the plan as an attachment (mail, Signal), e.g. `{every: 30d, notify: [tier1]}`",
    )


class Warnings(Strict):
    """Warnings are not outages: a backup older than its RPO, a certificate about to expire. They
    open incidents of scope `backup`/`certificate` (shown and recorded) and go only to these
    channels, only within these hours; one outside them waits for the next opening."""

    notify: list[str] = Field(
        default_factory=list, description="channel tags or names (none: recorded and shown, not sent)"
    )
    hours: str = Field(
        "Mon-Fri 08:00-18:00", description='when they may be sent: "Mon-Fri 08:00-18:00", "always"'
    )
    timezone: str = Field("UTC", description="IANA zone the hours are in, e.g. Europe/Berlin")

    @model_validator(mode="after")
    def _hours(self) -> Warnings:
        self.window  # noqa: B018 - parse now, so a bad value is named at load time
        return self

    @cached_property
    def window(self) -> WeeklyHours:
        return WeeklyHours.parse(self.hours, self.timezone)


class Notify(Strict):
    channels: list[Channel] = Field(default_factory=list, description="where alerts go")
    escalation: list[EscalationStep] = Field(default_factory=list, description="who is told when")
    update_every: Duration | None = Field(None, description="status message while an incident stays open")
    on_resolve: bool = Field(True, description="all-clear to everyone who was notified")
    all_clear_after: NonNegativeDuration = Field(
        60.0,
        description="the all-clear waits until the recovery held this long: a flapping target gets "
        "one page and one all-clear, not one per bounce",
    )
    status_url: str | None = Field(
        None,
        description="the status page as on-call reaches it (e.g. through a VPN); quoted in alerts "
        "with the ack link",
    )
    channel_warn_after: Duration = Field(
        300.0, description="a channel failing this long is reported through the others"
    )
    retry_max: Duration = Field(300.0, description="longest pause between two delivery attempts")
    give_up_after: Duration = Field(
        86400.0, description="an undeliverable message is dropped (and counted failed) after this"
    )
    warnings: Warnings = Field(
        default_factory=Warnings,
        description="backup and certificate warnings: who, and when (never at night by default)",
    )


class Provider(Strict):
    """An outside party an incident may need: the ISP, a hardware vendor, the insurer."""

    name: str | None = Field(None, description="as written in messages (defaults to the key)")
    phone: str | None = Field(None, description="their support line")
    contract: str | None = Field(None, description="contract or customer number to quote")
    circuit: str | None = Field(None, description="circuit id of the line (ISPs)")
    response_sla: Duration | None = Field(None, description="agreed time to respond; the report compares")


class Drills(Strict):
    """Alert-chain drills: every contact gets a DRILL message and confirms it."""

    every: Duration | None = Field(None, description="start a drill when the last one is this old (e.g. 90d)")
    window: Availability | None = Field(
        None, description="when scheduled drills may start, like `Tue-Thu 10:00-11:00` (in `timezone`)"
    )
    timezone: TimeZone = Field("UTC", description="IANA zone of `window`")
    confirm_within: Duration = Field(
        900.0, description="a person not confirming this long after their message counts as not reached"
    )
    compress: float = Field(
        1.0, gt=0, le=1, description="scheduled drills run the escalation delays times this factor"
    )


class FirstHourItem(Strict):
    label: str | None = Field(None, description="what the checklist calls it")
    at: NonNegativeDuration | None = Field(None, description="due this long after the first failure")


FIRST_HOUR_KEYS = (
    "symptom", "manual_check", "scope", "on_call", "decision", "logs", "management", "vendor_case",
    "restore",
)  # fmt: skip


# What `watchtower note --kind` records; the checklist ticks items from them.
NOTE_KINDS = (
    "decision",
    "vendor_case",
    "restore",
    "user_report",
    "logs",
    "management",
    "provider",
    "manual_check",
)


class Playbook(Strict):
    first_hour: dict[Literal[FIRST_HOUR_KEYS], FirstHourItem] = Field(  # type: ignore[valid-type]
        default_factory=dict,
        description="rename or re-time first-hour checklist items (symptom, manual_check, scope, "
        "on_call, decision, logs, management, vendor_case, restore)",
    )


class Heartbeat(Strict):
    _secret_fields = ("url",)
    url: SecretStr | None = Field(None, description="ping URL (a secret: prefer url_file)")
    url_file: SecretFile | None = Field(None, description="file holding the ping URL")
    every: Duration = Field(60.0, description="ping cadence")
    timeout: Duration = Field(10.0, description="bound on one ping")

    @model_validator(mode="after")
    def _url(self) -> Heartbeat:
        if self.secret("url") is None:
            raise ValueError("heartbeat needs url or url_file")
        return self


# Labels watchtower sets on every Alertmanager alert; `labels:` may not redefine them.
ALERT_LABELS = ("alertname", "site", "scope", "root", "cause")


class Alertmanager(Strict):
    """Incidents also go to Alertmanager's API v2, one alert each, for routing, silences and dedup."""

    _secret_fields = ("url",)
    url: SecretStr | None = Field(
        None, description="base URL, e.g. `http://alertmanager:9093` (may hold credentials: prefer url_file)"
    )
    url_file: SecretFile | None = Field(None, description="file holding the base URL")
    every: Duration = Field(
        60.0, description="re-post cadence while an incident is open; unless re-posted, expires in 4x this"
    )
    timeout: Duration = Field(10.0, description="bound on one post")
    labels: dict[str, str] = Field(
        default_factory=dict, description="extra labels on every alert (e.g. `customer`, `team`) for routing"
    )
    instance: str | None = Field(
        None,
        description="this watchtower's name in the annotations (default: the host name); not a label, "
        "so two vantage points of one site send the same alert and Alertmanager keeps one",
    )

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(f"{_short(name)} is not a label name (letters, digits, _)")
            if name in ALERT_LABELS:
                raise ValueError(f"label {_short(name)} is set by watchtower")
        return value

    @model_validator(mode="after")
    def _url(self) -> Alertmanager:
        secret = self.secret("url")
        if secret is None:
            raise ValueError("alertmanager needs url or url_file")
        if urlsplit(secret.get_secret_value()).scheme not in ("http", "https"):
            raise ValueError("alertmanager url must start with http:// or https://")
        return self


class MaintenanceWindow(Strict):
    """A recurring maintenance window: its targets are probed and recorded, but not paged for."""

    every: str = Field(
        description='when, in `timezone`: "Sun 02:00-04:00", "Mon-Fri 22:00-02:00" (ends the next '
        'day), "Sat,Sun 01:00-05:00", "daily 03:00-03:30"'
    )
    targets: list[str] = Field(default_factory=list, description="targets muted; empty: every target")
    timezone: str = Field("UTC", description="IANA time zone of `every`, e.g. Europe/Berlin")
    reason: str | None = Field(None, description="shown in the incident's timeline")

    @field_validator("every")
    @classmethod
    def _every(cls, value: str) -> str:
        parse_every(value)
        return value.strip()

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        zone(value)
        return value

    def window(self) -> Window:
        return Window(parse_every(self.every), self.timezone, tuple(self.targets), self.every, self.reason)


# --------------------------------------------------------------------------- the whole config


def _check_listen(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be HOST:PORT like 127.0.0.1:9847")
    host, port = _split_host_port(value)
    if port is None:
        raise ValueError("must be HOST:PORT like 127.0.0.1:9847")
    _check_host(host)
    return value.strip()


@dataclass(frozen=True, slots=True)
class ResolvedPath:
    """One path with every inherited setting filled in: what the scheduler runs."""

    target: str
    name: str
    spec: PathSpec
    interval: float
    retry_interval: float
    timeout: float
    fail_after: int
    recover_after: int
    is_bmc: bool = False  # a bmc: block: consulted to explain an outage, not a witness of it
    network: str | None = None  # the `networks:` entry it crosses (None: none configured or matched)
    host: str = ""  # the address or name it talks to
    by_bmc: bool = False  # answered by the target's BMC, not its own OS (a bmc: block or its address)

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def key(self) -> tuple[str, str]:
        return (self.target, self.name)


class Config(Strict):
    """The whole watchtower config. Load with :func:`load_config`."""

    _secret_fields = ("api_token",)
    site: str = Field(min_length=1, description="site name; root of 'monitor' incidents, label for MSPs")
    listen: Annotated[str, BeforeValidator(_check_listen)] = Field(
        "127.0.0.1:9847", description="HOST:PORT of /metrics, /healthz, /api/v1 and the status page"
    )
    state_dir: Path = Field(
        Path("/var/lib/watchtower"), description="SQLite incident log and notification outbox"
    )
    api_token: SecretStr | None = Field(
        None, description="bearer token for /api/v1 and the page (prefer the _file)"
    )
    api_token_file: SecretFile | None = Field(None, description="file holding api_token")
    metrics_auth: bool = Field(
        False,
        description="`/metrics` needs the API token too (Prometheus: `authorization: credentials_file`)",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="names this daemon is reached by (`Host:` header), besides IP addresses, "
        "the listen name and localhost; without an api_token other names are refused (DNS rebinding)",
    )
    max_concurrent_probes: int = Field(4096, ge=1, le=100_000, description="probes in flight at most")
    defaults: Defaults = Field(default_factory=Defaults, description="timings every path inherits")
    vantage: list[PathItem] = Field(
        default_factory=list,
        description="paths to the monitor's own uplink; all down => scope monitor, no paging",
    )
    targets: dict[TargetName, Target] = Field(min_length=1, description="what is monitored, by name")
    notify: Notify = Field(default_factory=Notify, description="channels and escalation")
    heartbeat: Heartbeat | None = Field(None, description="dead man's switch")
    alertmanager: Alertmanager | None = Field(None, description="also post incidents to Alertmanager API v2")
    log_format: Literal["text", "json"] = Field(
        "text",
        description="log lines on stderr: `text` (`key=value` fields) or `json` (one object a line, the "
        "fields parsed out); no timestamps under journald (`$JOURNAL_STREAM`), which adds its own",
    )
    traps: TrapListener | None = Field(None, description="the SNMP trap receiver, for `trap` paths")
    plan: Plan = Field(default_factory=Plan, description="the recovery plan's export and distribution")
    retention: Duration = Field(
        400 * 86400.0, description="resolved incidents older than this are deleted from the store"
    )
    maintenance: list[MaintenanceWindow] = Field(
        default_factory=list,
        description="recurring maintenance windows: incidents are recorded, pages wait for the window's end",
    )
    networks: dict[NetworkName, Network] = Field(
        default_factory=dict,
        description="the site's networks (e.g. `prod`, `mgmt`): a network failing while another still "
        "reaches its hosts is one incident named after it (without this, inferred from address prefixes)",
    )
    contacts: dict[str, Contact] = Field(
        default_factory=dict, description="people escalation steps reach (by `contacts:`), with availability"
    )
    providers: dict[str, Provider] = Field(
        default_factory=dict, description="ISP, vendors, insurer: named by targets' `provider`"
    )
    drills: Drills = Field(default_factory=Drills, description="alert-chain drills")
    playbook: Playbook = Field(default_factory=Playbook, description="the first-hour checklist")

    def secret_values(self) -> list[str]:
        """Every secret in the config (inline or from a ``*_file``), for the log scrubber."""
        out: list[str] = []
        stack: list[Any] = [self]
        while stack:
            item = stack.pop()
            if isinstance(item, SecretStr):
                out.append(item.get_secret_value())
            elif isinstance(item, FileSecret):
                out.append(item.value.get_secret_value())
                if "\n" in out[-1]:  # a file of communities: each line is one
                    out.extend(line.strip() for line in out[-1].splitlines() if line.strip())
            elif isinstance(item, BaseModel):
                stack.extend(getattr(item, name) for name in type(item).model_fields)
            elif isinstance(item, (list, tuple)):
                stack.extend(item)
            elif isinstance(item, dict):
                stack.extend(item.values())
        return out

    @model_validator(mode="after")
    def _metrics_auth(self) -> Config:
        if self.metrics_auth and self.secret("api_token") is None:
            raise ValueError("metrics_auth: true needs api_token or api_token_file")
        return self

    @field_validator("api_token", mode="after")
    @classmethod
    def _api_token(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty token would compare equal to a missing one: auth silently off.
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("is empty; remove the key to run without a token, or set one")
        return value

    @field_validator("state_dir", mode="after")
    @classmethod
    def _state_dir(cls, value: Path, info: ValidationInfo) -> Path:
        return value if value.is_absolute() else (_context_dir(info) / value)

    @cached_property
    def maintenance_windows(self) -> tuple[Window, ...]:
        return tuple(m.window() for m in self.maintenance)

    @property
    def listen_host_port(self) -> tuple[str, int]:
        host, port = _split_host_port(self.listen)
        assert port is not None
        return host, port

    @cached_property
    def paths(self) -> tuple[ResolvedPath, ...]:
        """Every target path with its effective settings, in config order."""
        return tuple(p for name, t in self.targets.items() for p in self._resolve(name, t.paths, t))

    @cached_property
    def backups(self) -> tuple[ResolvedBackup, ...]:
        """Every ``service.backups`` entry with its site-wide name and effective max_age."""
        out = []
        for tname, t in self.targets.items():
            if t.service is None:
                continue
            for b in t.service.backups:
                name = b.name or f"{tname}-{b.source.kind}"
                max_age = b.max_age if b.max_age is not None else t.service.rpo
                out.append(ResolvedBackup(name, tname, t.service.name, b, max_age))
        return tuple(out)

    @cached_property
    def vantage_paths(self) -> tuple[ResolvedPath, ...]:
        return tuple(self._resolve(VANTAGE, self.vantage, None))

    @cached_property
    def bmc_paths(self) -> tuple[ResolvedPath, ...]:
        """The ``bmc:`` blocks as paths of their targets, named ``bmc KIND HOST``."""
        out = []
        for name, t in self.targets.items():
            if t.bmc is None:
                continue
            for spec in (t.bmc.ipmi, t.bmc.redfish):
                if spec is not None:
                    (path,) = self._resolve(name, [spec], t)
                    out.append(replace(path, name=f"bmc {spec.display_name}", is_bmc=True, by_bmc=True))
        return tuple(out)

    def confirm_paths(self, target: str) -> int:
        own = self.targets[target].confirm_paths
        return own if own is not None else self.defaults.confirm_paths

    def network_of(self, spec: PathSpec) -> str | None:
        """The network a path crosses: its ``network:``, else the most specific cidr holding its
        address (a host name matches none)."""
        if spec.network is not None or not self.networks:
            return spec.network
        try:
            address = ipaddress.ip_address(path_host(spec))
        except ValueError:
            return None
        best: tuple[int, str] | None = None
        for name, net in self.networks.items():
            for cidr in net.cidr:
                if address in cidr and (best is None or cidr.prefixlen > best[0]):
                    best = (cidr.prefixlen, name)
        return best[1] if best else None

    def _resolve(self, target: str, specs: list[PathSpec], owner: Target | None) -> Iterator[ResolvedPath]:
        d = self.defaults
        bmc_hosts = (
            {s.host for s in (owner.bmc.ipmi, owner.bmc.redfish) if s is not None}
            if owner is not None and owner.bmc is not None
            else set()
        )
        for spec in specs:

            def pick(key: str, spec: PathSpec = spec) -> Any:
                for layer in (spec, owner):
                    if layer is not None and getattr(layer, key) is not None:
                        return getattr(layer, key)
                base = getattr(d, key)
                return max(base, KIND_TIMEOUT_FLOOR.get(spec.kind, 0.0)) if key == "timeout" else base

            yield ResolvedPath(
                target=target,
                name=spec.display_name,
                spec=spec,
                interval=pick("interval"),
                retry_interval=pick("retry_interval"),
                timeout=pick("timeout"),
                fail_after=pick("fail_after"),
                recover_after=pick("recover_after"),
                network=self.network_of(spec),
                host=path_host(spec),
                by_bmc=spec.kind in ("ipmi", "redfish") or path_host(spec) in bmc_hosts,
            )


def path_host(spec: PathSpec) -> str:
    """The address or name a path talks to."""
    return str(getattr(spec, "host", ""))


def unplaced_paths(cfg: Config) -> list[ResolvedPath]:
    """Target paths on no network while networks are configured: they depend on no device, so a
    network failure cannot explain them (``watchtower check`` warns)."""
    if not cfg.networks:
        return []
    return [p for p in (*cfg.paths, *cfg.bmc_paths) if p.network is None]


# --------------------------------------------------------------------------- checks beyond one key


def _did_you_mean(word: str, options: Any) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _semantic_problems(cfg: Config) -> list[str]:
    """References, cycles, unique names, and timings that cannot work together."""
    problems: list[str] = []
    names = set(cfg.targets)
    for tname, target in cfg.targets.items():
        base = f"targets.{tname}"
        for i, dep in enumerate(target.depends_on):
            if dep not in names:
                problems.append(
                    f"{base}.depends_on[{i}]: no target named {_short(dep)}{_did_you_mean(dep, names)}"
                )
            elif dep == tname:
                problems.append(f"{base}.depends_on[{i}]: a target cannot depend on itself")
        if target.runs_on is not None:
            hv = cfg.targets.get(target.runs_on)
            if hv is None:
                problems.append(
                    f"{base}.runs_on: no target named {_short(target.runs_on)}"
                    + _did_you_mean(target.runs_on, names)
                )
            elif hv.role != "hypervisor":
                problems.append(
                    f"{base}.runs_on: {_short(target.runs_on)} has role {hv.role}, not hypervisor"
                )
        for i, st in enumerate(target.storage):
            store = cfg.targets.get(st)
            if store is None:
                problems.append(
                    f"{base}.storage[{i}]: no target named {_short(st)}{_did_you_mean(st, names)}"
                )
            elif store.role != "storage":
                problems.append(f"{base}.storage[{i}]: {_short(st)} has role {store.role}, not storage")
    if cfg.traps is None:
        for tname, target in cfg.targets.items():
            for i, spec in enumerate(target.paths):
                if spec.kind == "trap":
                    problems.append(
                        f"targets.{tname}.paths[{i}]: a trap path needs the `traps:` receiver configured"
                    )
    seen_backups: dict[str, str] = {}
    for b in cfg.backups:
        if b.name in seen_backups:
            problems.append(
                f"targets.{b.target}.service.backups: name {b.name!r} is used twice "
                f"(also on {seen_backups[b.name]}); give each a unique `name`"
            )
        seen_backups[b.name] = b.target
    for i, window in enumerate(cfg.maintenance):
        for j, name in enumerate(window.targets):
            if name not in names:
                problems.append(
                    f"maintenance[{i}].targets[{j}]: no target named {name!r}{_did_you_mean(name, names)}"
                )
    for nname, net in cfg.networks.items():
        for i, via in enumerate(net.via):
            if via not in names:
                problems.append(
                    f"networks.{nname}.via[{i}]: no target named {via!r}{_did_you_mean(via, names)}"
                )
    for tname, target in cfg.targets.items():
        for i, spec in enumerate(target.paths):
            if spec.network is not None and spec.network not in cfg.networks:
                hint = _did_you_mean(spec.network, cfg.networks) if cfg.networks else " (no `networks:` set)"
                where = f"targets.{tname}.paths[{i}].network"
                problems.append(f"{where}: no network named {spec.network!r}{hint}")
    problems += _cycle_problems(cfg)
    problems += _path_problems(cfg)
    problems += _notify_problems(cfg)
    return problems


def dependency_edges(cfg: Config) -> dict[str, list[str]]:
    """target -> what it needs (depends_on + runs_on + storage), known targets only."""
    edges: dict[str, list[str]] = {}
    for name, t in cfg.targets.items():
        needs = [*t.depends_on, *([t.runs_on] if t.runs_on else []), *t.storage]
        edges[name] = [n for n in dict.fromkeys(needs) if n in cfg.targets and n != name]
    return edges


def _cycle_problems(cfg: Config) -> list[str]:
    edges = dependency_edges(cfg)
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    problems: list[str] = []
    for start in edges:
        if state.get(start):
            continue
        stack: list[tuple[str, Iterator[str]]] = [(start, iter(edges[start]))]
        trail = [start]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                trail.pop()
                state[node] = 2
            elif state.get(child) == 1:
                cycle = [*trail[trail.index(child) :], child]
                problems.append(f"targets.{child}: dependency cycle {' -> '.join(cycle)}")
            elif not state.get(child):
                state[child] = 1
                stack.append((child, iter(edges[child])))
                trail.append(child)
    return problems


def _path_problems(cfg: Config) -> list[str]:
    problems: list[str] = []
    inherited: dict[str, tuple[str, str, list[str]]] = {}  # place -> (timeout, interval, paths)
    groups = [(f"targets.{t}", [p for p in cfg.paths if p.target == t]) for t in cfg.targets]
    groups.append(("vantage", list(cfg.vantage_paths)))
    for base, paths in groups:
        seen: dict[str, int] = {}
        for i, p in enumerate(paths):
            where = f"{base}.paths[{i}]" if base != "vantage" else f"vantage[{i}]"
            if p.name in seen:
                problems.append(
                    f"{where}.name: {p.name!r} is already the name of paths[{seen[p.name]}]; "
                    "give one a distinct name"
                )
            seen.setdefault(p.name, i)
            if p.timeout > p.interval:
                # Report it where the value was written: one line for a default, not one per path.
                owner = cfg.targets.get(p.target)
                if p.spec.timeout is not None:
                    place = f"{where}.timeout"
                elif owner is not None and owner.timeout is not None:
                    place = f"{base}.timeout"
                elif p.timeout == cfg.defaults.timeout:
                    place = "defaults.timeout"
                else:  # the kind's floor (http 3s, ...) is above the interval
                    place = f"{where}.timeout"
                    detail = f"the {p.kind} timeout floor {format_duration(p.timeout)}"
                    inherited.setdefault(place, (detail, format_duration(p.interval), []))
                    continue
                timings: tuple[str, str, list[str]] = (
                    format_duration(p.timeout),
                    format_duration(p.interval),
                    [],
                )
                inherited.setdefault(place, timings)[2].append(where)
    for place, (timeout, interval, where_used) in inherited.items():
        scope = f" (used by {len(where_used)} paths, e.g. {where_used[0]})" if len(where_used) > 1 else ""
        problems.append(f"{place}: {timeout} is longer than its interval {interval}{scope}")
    return problems


def _notify_problems(cfg: Config) -> list[str]:
    problems: list[str] = []
    channel_names = [c.name for c in cfg.notify.channels]
    for i, name in enumerate(channel_names):
        if name in channel_names[:i]:
            problems.append(f"notify.channels[{i}].name: {_short(name)} is used by another channel")
    known = set(channel_names) | {tag for c in cfg.notify.channels for tag in c.tags}
    for i, step in enumerate(cfg.notify.escalation):
        for j, tag in enumerate(step.notify):
            if tag not in known:
                problems.append(
                    f"notify.escalation[{i}].notify[{j}]: no channel has tag or name {tag!r}"
                    + _did_you_mean(tag, known)
                )
        for j, name in enumerate(step.contacts):
            if name not in cfg.contacts:
                problems.append(
                    f"notify.escalation[{i}].contacts[{j}]: no contact named {name!r}"
                    + _did_you_mean(name, cfg.contacts)
                )
        if step.rto_fraction is not None and not any(
            t.service and t.service.rto for t in cfg.targets.values()
        ):
            problems.append(
                f"notify.escalation[{i}].rto_fraction: no target has a service.rto to take a fraction of"
            )
    selectors = [(f"notify.warnings.notify[{j}]", tag) for j, tag in enumerate(cfg.notify.warnings.notify)]
    if cfg.plan.distribute is not None:
        selectors += [
            (f"plan.distribute.notify[{j}]", tag) for j, tag in enumerate(cfg.plan.distribute.notify)
        ]
    for where, tag in selectors:
        if tag not in known:
            problems.append(f"{where}: no channel has tag or name {tag!r}" + _did_you_mean(tag, known))
    for cname, contact in cfg.contacts.items():
        for j, ref in enumerate(contact.channels):
            if ref not in known:
                problems.append(
                    f"contacts.{cname}.channels[{j}]: no channel has tag or name {ref!r}"
                    + _did_you_mean(ref, known)
                )
    from watchtower.people import unreachable_steps

    problems += unreachable_steps(cfg)
    for tname, target in cfg.targets.items():
        if target.provider is not None and target.provider not in cfg.providers:
            problems.append(
                f"targets.{tname}.provider: no provider named {target.provider!r}"
                + _did_you_mean(target.provider, cfg.providers)
            )
    return problems


# --------------------------------------------------------------------------- loading and error messages


CONFIG_FILE_MAX = 32 * 1024 * 1024  # 10,000 paths take about 1 MB
YAML_NODES_MAX = 2_000_000  # nodes after alias expansion: what validation will walk
YAML_DEPTH_MAX = 100


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML silently keeps the last of two equal keys: a second `pve1:` would hide the first.

    Also bounded: a document is refused when its aliases would expand to more than
    ``YAML_NODES_MAX`` nodes (a 700-byte "billion laughs" of nine levels of ten is 10^9) or it
    nests deeper than ``YAML_DEPTH_MAX``; validation walks the expanded tree, so either would
    take the memory and time of the expansion."""

    def get_single_node(self) -> yaml.Node | None:
        node = super().get_single_node()
        if node is not None:
            _check_expansion(node)
        return node


def _check_expansion(root: yaml.Node) -> None:
    """Expanded size and depth of a composed document, each distinct node visited once (an
    alias is the same node object: its size is counted at every place that refers to it)."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    # Iterative post-order walk: the composer has already built the graph, recursion here could
    # only hit Python's limit.
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in size:
            continue
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        if not done:
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in size)
            continue
        size[id(node)] = 1 + sum(size.get(id(c), 1) for c in children)
        depth[id(node)] = 1 + max((depth.get(id(c), 1) for c in children), default=0)
        mark = node.start_mark
        if size[id(node)] > YAML_NODES_MAX:
            raise yaml.constructor.ConstructorError(
                None, None, f"aliases expand to more than {YAML_NODES_MAX:,} values", mark
            )
        if depth[id(node)] > YAML_DEPTH_MAX:
            raise yaml.constructor.ConstructorError(
                None, None, f"nested more than {YAML_DEPTH_MAX} levels deep", mark
            )


def _construct_mapping(
    loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False
) -> dict[Any, Any]:
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen[key] = True
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _one_line(text: str) -> str:
    """A problem is one line: control characters (a newline in a key, a NUL in a value) are escaped."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    parts = list(loc)
    for i, part in enumerate(parts):
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        # Drop the discriminator tag pydantic puts after a path index (paths[2].icmp.timeout ->
        # paths[2].timeout), and its internal names of validators, so the place reads like the YAML.
        if i > 0 and isinstance(parts[i - 1], int) and part in PATH_KINDS and i < len(parts) - 1:
            continue
        if part.startswith(("function-", "tagged-union", "json-or-python")):
            continue
        if part == "in_":
            part = "in"
        if not isinstance(part, str) or not part.strip() or part != part.strip() or not part.isprintable():
            part = repr(part)  # a key like "\r" or " x" must be visible in the place
        out += f".{part}" if out else str(part)
    return out or "(top level)"


def _model_for_loc(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """Best effort: the model class that owns the last key of loc, to suggest a spelling."""
    model: Any = Config
    for i, part in enumerate(loc[:-1]):
        if isinstance(part, int) or model is None:
            continue
        if model is Config and part == "targets":
            model = Target
            continue
        if model is Target and loc[i - 1] == "targets":
            continue
        fields = getattr(model, "model_fields", {})
        if part in fields:
            ann = fields[part].annotation
            model = _first_model(ann)
        elif part in PATH_KINDS:
            model = _KIND_MODELS.get(part)
        else:
            return None
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _first_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _first_model(arg)
        if found is not None:
            return found
    return None


_KIND_MODELS: dict[str, type[BaseModel]] = {
    "icmp": IcmpPath, "tcp": TcpPath, "http": HttpPath, "dns": DnsPath,
    "snmp": SnmpPath, "ipmi": IpmiSpec, "redfish": RedfishSpec, "nut": NutPath, "trap": TrapPath,
}  # fmt: skip


def _format_error(err: Mapping[str, Any]) -> str:
    loc: tuple[int | str, ...] = tuple(err["loc"])
    kind = err["type"]
    msg = str(err["msg"])
    if kind == "extra_forbidden":
        model = _model_for_loc(loc)
        known = [f.alias or n for n, f in model.model_fields.items()] if model else []
        msg = f"unknown key{_did_you_mean(str(loc[-1]), known)}"
    elif kind == "missing":
        msg = "required key is missing"
    elif kind in ("value_error", "assertion_error"):
        msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    elif kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        msg = f"must be one of {expected.replace(chr(39), '')}, got {_short(err.get('input'))}"
    elif kind == "union_tag_invalid":
        msg = f"unknown path kind{_did_you_mean(str(err.get('input', '')), PATH_KINDS)}"
    elif kind in ("model_type", "model_attributes_type", "dict_type"):
        # pydantic says "a valid dictionary or instance of Target": the class name means nothing to a user
        got = err.get("input")
        names = {str: "a text", list: "a list", int: "a number", float: "a number", bool: "true/false"}
        what = "nothing" if got is None else names.get(type(got), "something else")
        msg = f"must be a mapping of settings, got {what} (check the indentation of the lines below it)"
    elif kind == "too_short":
        n = err.get("ctx", {}).get("min_length", 1)
        msg = f"needs at least {n} {'entry' if n == 1 else 'entries'}"
    elif msg:
        msg = f"{msg[0].lower()}{msg[1:]}"
    return _one_line(f"{_format_loc(loc)}: {msg}")


def parse_config(data: Any, config_dir: Path) -> Config:
    """Validate already-parsed YAML. Raises ConfigError."""
    if not isinstance(data, Mapping):
        raise ConfigError(["(top level): the config must be a mapping of keys like site, targets, notify"])
    try:
        cfg = Config.model_validate(data, context={"config_dir": config_dir})
    except ValidationError as exc:
        raise ConfigError(list(dict.fromkeys(_format_error(e) for e in exc.errors()))) from None
    problems = _semantic_problems(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


# PyYAML's words for a block that is indented too much, too little, or not at all.
_INDENT_PROBLEMS = (
    "mapping values are not allowed",
    "expected <block end>",
    "could not find expected ':'",
    "did not find expected key",
    "did not find expected '-' indicator",
    "found character '\\t'",
)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, parse and validate a config file. Raises ConfigError with one line per problem."""
    file = Path(path)
    return parse_config(_read_yaml(file), file.resolve().parent)


class ClientConfig(BaseModel):
    """What the commands that only talk to the daemon need (where it listens, its token, its
    store): they work with the API token alone, even where the other secrets are not readable."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    _secret_fields: ClassVar[tuple[str, ...]] = ("api_token",)
    site: str = ""
    listen: Annotated[str, BeforeValidator(_check_listen)] = "127.0.0.1:9847"
    state_dir: Path = Path("/var/lib/watchtower")
    api_token: SecretStr | None = None
    api_token_file: SecretFile | None = None

    @field_validator("state_dir", mode="after")
    @classmethod
    def _state_dir(cls, value: Path, info: ValidationInfo) -> Path:
        return value if value.is_absolute() else (_context_dir(info) / value)

    @property
    def listen_host_port(self) -> tuple[str, int]:
        host, port = _split_host_port(self.listen)
        assert port is not None
        return host, port

    def secret(self, name: str) -> SecretStr | None:
        return _pick_secret(self, name)


def load_client_config(path: str | os.PathLike[str]) -> ClientConfig:
    """The daemon's address, token and store from a config file. Raises ConfigError."""
    file = Path(path)
    data = _read_yaml(file)
    if not isinstance(data, Mapping):
        raise ConfigError(["(top level): the config must be a mapping of keys like site, targets, notify"])
    try:
        return ClientConfig.model_validate(data, context={"config_dir": file.resolve().parent})
    except ValidationError as exc:
        raise ConfigError(list(dict.fromkeys(_format_error(e) for e in exc.errors()))) from None


def _read_yaml(file: Path) -> Any:
    try:
        text = read_regular_file(file, CONFIG_FILE_MAX)
    except FileNotFoundError:
        raise ConfigError([f"{file}: no such file"]) from None
    except ValueError as exc:
        raise ConfigError([_one_line(str(exc))]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{file}: cannot read ({exc.__class__.__name__}: {exc})"]) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except RecursionError:
        # The composer recurses per level: 50,000 `[` exhaust the stack before our depth check.
        raise ConfigError([f"{file}: invalid YAML: nested more than {YAML_DEPTH_MAX} levels deep"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark else str(file)
        problem = getattr(exc, "problem", None) or str(exc)
        hint = ""
        if any(p in problem for p in _INDENT_PROBLEMS):
            hint = " (check the indentation: settings go 2 spaces deeper than their key, siblings line up)"
        raise ConfigError([_one_line(f"{where}: invalid YAML: {problem}{hint}")]) from None
    return data


def _yaml_path_schema() -> dict[str, Any]:
    """A path as written in YAML: one key KIND whose value is a short form string or the settings."""
    short = {"icmp": "ADDR", "tcp": "HOST:PORT", "http": "URL"}
    options = []
    for kind, model in _KIND_MODELS.items():
        ref = {"$ref": f"#/$defs/{model.__name__}"}
        value = {"anyOf": [{"type": "string", "description": short[kind]}, ref]} if kind in short else ref
        options.append(
            {"type": "object", "properties": {kind: value}, "required": [kind], "additionalProperties": False}
        )
    return {"oneOf": options}


def _rewrite_paths(node: Any) -> Any:
    if isinstance(node, dict):
        if node.get("discriminator", {}).get("propertyName") == "kind":
            return _yaml_path_schema()
        return {k: _rewrite_paths(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_rewrite_paths(v) for v in node]
    return node


def json_schema() -> dict[str, Any]:
    """The config's JSON Schema in the form the YAML is written (paths as ``KIND: SPEC``)."""
    schema: dict[str, Any] = _rewrite_paths(Config.model_json_schema(mode="validation"))
    for model in _KIND_MODELS.values():
        definition = schema["$defs"].get(model.__name__, {})
        definition.get("properties", {}).pop("kind", None)
        if "kind" in definition.get("required", []):
            definition["required"].remove("kind")
    schema = _duration_defaults(schema)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "watchtower configuration"
    return schema


def _is_duration(node: Mapping[str, Any]) -> bool:
    if node.get("pattern") == DURATION_PATTERN:
        return True
    return any(isinstance(b, Mapping) and _is_duration(b) for b in node.get("anyOf", ()))


def _duration_defaults(node: Any) -> Any:
    """Defaults of duration keys as they are written in YAML (``"5s"``), not pydantic's seconds."""
    if isinstance(node, dict):
        out = {k: _duration_defaults(v) for k, v in node.items()}
        default = out.get("default")
        if isinstance(default, int | float) and not isinstance(default, bool) and _is_duration(out):
            out["default"] = format_duration(float(default))
        return out
    if isinstance(node, list):
        return [_duration_defaults(v) for v in node]
    return node
