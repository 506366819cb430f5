"""Leadership of a background loop among the API processes that share one store.

Every API process runs the loops (the dispatcher, the notifier); only the holder of the
loop's lease in the store works, so a deployment with several processes acts as one. A
holder that dies loses the lease when it expires and another process takes over.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from dataclasses import dataclass, field

from service.store import JobStore

log = logging.getLogger(__name__)


@dataclass
class Leadership:
    """This process's claim on the lease ``name``.

    Args:
        store: where the lease lives.
        name: the lease (one per loop).
        lease_s: how long a claim lasts unless renewed.
        working: what the log says when this process leads ("dispatches", ...).
    """

    store: JobStore
    name: str
    lease_s: float
    working: str
    holder: str = field(
        default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    )
    leading: bool | None = None

    def lead(self) -> bool:
        """Take or renew the lease; whether this process leads (logged when it changes)."""
        leading = self.store.acquire_lease(self.name, self.holder, self.lease_s)
        if leading != self.leading:
            state = self.working if leading else f"stands by: another API process {self.working}"
            log.info("%s %s %s", self.name, self.holder, state)
            self.leading = leading
        return leading

    def resign(self) -> None:
        """Give the lease up (at shutdown), so another process leads at once."""
        self.store.release_lease(self.name, self.holder)
        self.leading = None
