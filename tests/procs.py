"""Stopping one `ray start --head` by its temp dir, without `ray stop` (which would stop every
Ray instance of the user, the test session's included)."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def _table() -> dict[int, tuple[int, str]]:
    """pid → (parent pid, command line) from /proc."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        out[int(d.name)] = (ppid, cmd)
    return out


def kill_tree(marker: str, timeout: float = 15.0) -> int:
    """SIGTERM, then SIGKILL, every process whose command line contains `marker` and all their
    descendants. Returns how many processes were signalled."""
    table = _table()
    doomed = {pid for pid, (_, cmd) in table.items() if marker in cmd and pid != os.getpid()}
    grew = True
    while grew:
        children = {pid for pid, (ppid, _) in table.items() if ppid in doomed} - doomed - {os.getpid()}
        grew = bool(children)
        doomed |= children
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in doomed:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + timeout
        while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in doomed):
            time.sleep(0.2)
    return len(doomed)
