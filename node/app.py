"""Opening the node's state (database, object store, registry) from a configuration.

The composition root of the node's storage: it names every table, so that the storage layer
never imports the modules that define tables on top of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import peewee

from node.config import Config
from node.pipeline import jobs, outbox
from node.review import verdicts
from node.storage import index, registry
from node.storage.db import open_database
from node.storage.objects import ObjectStore
from node.storage.registry import Registry
from node.ups import store as ups_store


def tables() -> list[type[peewee.Model]]:
    """Every table of the node: the index, the model registry, the jobs, the outbox and the UPS
    workitems and subscriptions, the verdicts on results."""
    modules = (index, registry, jobs, outbox, ups_store, verdicts)
    return [obj for module in modules for obj in vars(module).values()
            if isinstance(obj, type) and issubclass(obj, peewee.Model) and obj.__module__ == module.__name__
            and not getattr(obj._meta, "abstract", False)]


@dataclass
class App:
    config: Config
    db: peewee.Database
    store: ObjectStore
    registry: Registry

    def close(self) -> None:
        if not self.db.is_closed():
            self.db.close()


def open_app(config: Config) -> App:
    data_dir = config.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    # No clean_partial() here: every CLI command opens the app, and a running node has files
    # in tmp/ that it is receiving into. The node cleans tmp/ when it starts (node.dimse.store_scp.prepare).
    store = ObjectStore(data_dir, fsync=config.storage.fsync)
    db = open_database(config.database_url, tables())
    registry = Registry(store, max_payload=config.models.max_payload_bytes)
    return App(config=config, db=db, store=store, registry=registry)
