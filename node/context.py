"""What every DIMSE handler needs: the node's state, its configuration and its loggers.

``node.dimse.server`` builds one :class:`NodeContext` and binds each handler with it
(``handler(event, ctx)``), so handlers never reach for globals.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from node.app import App
from node.config import Config


@dataclass
class NodeContext:
    app: App
    # Serialises writes to SQLite (one writer at a time); readers go straight to the database.
    write_lock: threading.Lock = field(default_factory=threading.Lock)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("modelnode"))

    @property
    def config(self) -> Config:
        return self.app.config
