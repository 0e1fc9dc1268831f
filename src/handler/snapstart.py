"""Lambda SnapStart hooks (opt-in: template parameter SnapStart=on; docs/deploy.md section 10).

With SnapStart, Lambda runs the function's initialisation once when a version is published, snapshots
the memory, and starts new execution environments from that snapshot. Two consequences here:

- Before the snapshot, build the service: the imports `handler.wiring` defers and the clients it
  creates then cost nothing at a restore. Creating boto3 and httpx clients opens no connection, and
  the Cube secret is fetched on first use, so the snapshot holds neither a socket nor a secret.
- After a restore, every environment resumes with the same memory: reseed `random` (the Cube client's
  retry jitter), so that environments restored together do not retry in lockstep. Tokens use
  `uuid.uuid4()` (os.urandom), which a restore does not repeat.

`snapshot_restore_py` is part of Lambda's managed Python runtimes (not a dependency of this package);
outside them, `register` does nothing.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any


def register(build: Callable[[], Any]) -> bool:
    """Register the hooks; False when the runtime has no snapshot support (local runs, tests)."""
    try:
        from snapshot_restore_py import (  # type: ignore[import-not-found]  # noqa: PLC0415
            register_after_restore,
            register_before_snapshot,
        )
    except ImportError:
        return False
    register_before_snapshot(build)
    register_after_restore(random.seed)
    return True
