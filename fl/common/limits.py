"""Open-file limits. A server or worker with a thousand connections needs more descriptors
than the soft limit many systems start processes with (1,024); the hard limit is usually
far higher and a process may raise its own soft limit up to it."""
from __future__ import annotations

import logging
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
