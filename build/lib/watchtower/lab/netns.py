"""Enter a named network namespace from Python, per thread, without a subprocess.

Shared by the responder (which creates its listening sockets inside every host namespace) and by
:mod:`watchtower.lab.site` (which talks to each simulated BMC's console on the BMC namespace's own
loopback).  A socket belongs to the namespace it was *created* in, so entering a namespace just
long enough to create/connect a socket and then switching back is enough.  Stdlib only.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


def setns(fd: int) -> None:
    """Move the calling thread into the network namespace behind ``fd`` (no os.setns in 3.11)."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Temporarily enter ``/run/netns/NAME``; always switch back (and die loudly if we cannot,
    because creating further sockets in the wrong namespace would be silently wrong)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            setns(target)
            try:
                yield
            finally:
                setns(own)
        finally:
            os.close(target)
    finally:
        os.close(own)
