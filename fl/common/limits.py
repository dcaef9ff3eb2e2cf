"""Process limits. Open files: a server or worker with a thousand connections needs more
descriptors than the soft limit many systems start processes with (1,024); the hard limit
is usually far higher and a process may raise its own soft limit up to it. Memory: glibc's
allocator keeps freed update-sized buffers unless told otherwise (``limit_malloc_arenas``,
``malloc_trim``); elsewhere than glibc both are no-ops."""
from __future__ import annotations

import ctypes
import logging
import os
import resource

log = logging.getLogger("limits")


def raise_open_files(needed: int) -> int:
    """Raise the soft RLIMIT_NOFILE so ``needed`` descriptors fit, as far as the hard limit
    allows (a warning when it does not); the soft limit in force afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
        return soft
    if target < needed:
        log.warning("open-file limit %d (the hard limit) is below the %d this process may need; "
                    "raise it with ulimit -n", target, needed)
    return target


def limit_malloc_arenas(n: int = 2) -> None:
    """glibc gives busy threads their own malloc arenas (up to 8 per core) and keeps freed
    blocks in each, so with a thread per client every update-sized buffer ends up cached
    once per arena. Two arenas bound that; the GIL serialises the threads anyway. A
    ``MALLOC_ARENA_MAX`` in the environment wins."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    _glibc("mallopt", -8, n)  # M_ARENA_MAX


def malloc_trim() -> None:
    """glibc returns a freed large block to the kernel only if it was mmap-ed, and raises its
    mmap threshold to the size of each such block freed: after one 16 MB frame, the next
    are carved from the heap and their pages stay in RSS once freed. ``malloc_trim(0)``
    gives every free page of every arena back."""
    _glibc("malloc_trim", 0)


def _glibc(function: str, *args: int) -> None:
    """Call one of glibc's malloc functions; nothing where the C library is another."""
    try:
        getattr(ctypes.CDLL(None), function)(*args)
    except (AttributeError, OSError, TypeError):  # not glibc
        pass
