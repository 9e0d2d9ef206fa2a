"""systemd's notify protocol (``sd_notify(3)``) in pure Python: one datagram per state change.

``Type=notify`` units get ``$NOTIFY_SOCKET`` (a path, or an abstract socket name starting with
``@``); ``WatchdogSec=`` adds ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``). Outside systemd neither
is set and every call here is a no-op, so the daemon does not need to know whether it runs under
systemd. Sending never raises: a monitor must not die because its supervisor went away.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("watchtower.sdnotify")


def _address(raw: str) -> str | bytes | None:
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()  # abstract namespace: leading NUL, no file
    if raw.startswith("/"):
        return raw
    return None  # vsock (vsock:CID:PORT) and others are not used for services on a host


def watchdog_interval(env: dict[str, str] | None = None) -> float | None:
    """How often to send ``WATCHDOG=1`` (half of ``WatchdogSec=``), or None when no watchdog is
    armed for this process (unset, 0, or meant for another PID)."""
    env = dict(os.environ) if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    return usec / 2 / 1_000_000


class Notifier:
    """Sends state lines to ``$NOTIFY_SOCKET``; inert when it is unset."""

    def __init__(self, socket_path: str | None = None):
        raw = os.environ.get("NOTIFY_SOCKET", "") if socket_path is None else socket_path
        self.address = _address(raw) if raw else None
        self._sock: socket.socket | None = None
        if raw and self.address is None:
            log.warning("NOTIFY_SOCKET=%s is not a unix socket path; not notifying systemd", raw)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send ``lines`` (``READY=1``, ``STATUS=...``) as one datagram; True if it went out."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(lines).encode(), self.address)
            return True
        except OSError as exc:  # systemd gone, socket full: the next message may get through
            log.debug("sd_notify failed error=%s", exc)
            return False

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        # systemd >= 253 wants MONOTONIC_USEC with RELOADING=1 (Type=notify-reload); older ignore it.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
