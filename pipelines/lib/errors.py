"""Turning failures deep inside writers and Ray tasks into one clear line for the user."""
from __future__ import annotations

import os
import re

_OS_TEXT = re.compile(r"(No space left on device|File too large|Disk quota exceeded|Read-only file system"
                      r"|Permission denied)")


def os_reason(exc: BaseException) -> str:
    """The operating-system reason in `exc`, its causes, or its text (Ray and torch wrap them):
    'No space left on device', 'File too large', …; else the exception's first line."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and isinstance(seen.errno, int) and seen.errno > 0:
            return os.strerror(seen.errno)        # pyarrow's own strerror is "Error writing bytes…"
        if isinstance(seen, OSError) and isinstance(seen.strerror, str) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    found = _OS_TEXT.search(text)
    if found:
        return found.group(1)
    first = text.strip().splitlines()
    return f"{type(exc).__name__}: {first[0] if first else ''}"


def find_cause(exc: BaseException, cls: type[BaseException] | tuple[type[BaseException], ...]
               ) -> BaseException | None:
    """An exception of type `cls` in `exc`'s chain, looking through Ray's wrappers
    (`RayTaskError.cause`, Ray Train's `worker_failures`), or None. Ray's own dual-class wrappers
    (`RayTaskError(DatasetError)`, whose text is a whole remote traceback) are passed over for
    the original, so a driver can report a worker's error in one line; the outermost match wins.
    Ray Data keeps only the text of a UDF's error: there the last `module.Class: message` line of
    `cls` is rebuilt."""
    classes = cls if isinstance(cls, tuple) else (cls,)
    seen, todo, chain = set(), [exc], []
    while todo:                                   # outermost first
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        chain.append(e)
        if isinstance(e, classes) and not type(e).__module__.startswith("ray."):
            return e
        todo += [e.__cause__, None if e.__suppress_context__ else e.__context__, getattr(e, "cause", None)]
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            todo += [v for v in failures.values() if isinstance(v, BaseException)]
    for e in chain:
        for c in classes:
            lines = re.findall(rf"^{re.escape(c.__module__)}\.{re.escape(c.__qualname__)}: (.+)$", str(e), re.M)
            if lines:
                return c(lines[-1])
    return None
