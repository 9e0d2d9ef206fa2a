"""Run a backup tool as a killable subprocess with a deadline and a bounded output."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from dataclasses import dataclass

MAX_OUTPUT = 16 * 1024 * 1024  # a listing bigger than this is not one we asked for
_KILL_MARGIN = 2.0


@dataclass(frozen=True, slots=True)
class Run:
    returncode: int | None  # None: killed (timed out or too much output) or did not start
    stdout: bytes
    stderr: str
    problem: str = ""  # why there is no returncode, for the probe's detail


def tool_env(extra: dict[str, str]) -> dict[str, str]:
    """A minimal environment: nothing of the daemon's own leaks in; LC_ALL=C for stable messages."""
    return {"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C", "HOME": "/nonexistent", **extra}


async def run_tool(argv: list[str], env: dict[str, str], deadline_s: float) -> Run:
    exe = shutil.which(argv[0], path=env.get("PATH"))
    if exe is None:
        return Run(None, b"", "", f"{argv[0]} not found on PATH (install it or set `binary`)")
    try:
        proc = await asyncio.create_subprocess_exec(
            exe,
            *argv[1:],
            stdin=asyncio.subprocess.DEVNULL,  # never a prompt that waits forever
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            start_new_session=True,  # its children (ssh for a remote repository) die with it
        )
    except OSError as exc:
        return Run(None, b"", "", f"cannot start {argv[0]}: {exc.strerror or exc}")
    out, err = bytearray(), bytearray()
    too_big = False

    async def pump(stream: asyncio.StreamReader | None, buf: bytearray, cap: int) -> None:
        nonlocal too_big
        while stream is not None and (chunk := await stream.read(65536)):
            if len(buf) < cap:
                buf += chunk[: cap - len(buf)]
            elif cap == MAX_OUTPUT:
                too_big = True
                return

    problem = ""
    try:
        async with asyncio.timeout(deadline_s):
            await asyncio.gather(pump(proc.stdout, out, MAX_OUTPUT), pump(proc.stderr, err, 65536))
            if too_big:
                problem = f"{argv[0]} printed more than {MAX_OUTPUT // 1048576} MB"
            else:
                await proc.wait()
    except TimeoutError:
        problem = f"{argv[0]} did not finish within {deadline_s:g}s (killed)"
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_KILL_MARGIN):
                    await proc.wait()
    if problem:
        return Run(None, bytes(out), err.decode("utf-8", "replace"), problem)
    return Run(proc.returncode, bytes(out), err.decode("utf-8", "replace"))


def scrub(text: str, secrets: tuple[str, ...] = (), limit: int = 200) -> str:
    """A stderr excerpt fit for a detail: one line, short, printable, no secret in it."""
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    for secret in secrets:
        if len(secret) >= 4:
            text = text.replace(secret, "***")
    return text if len(text) <= limit else text[: limit - 1] + "…"
