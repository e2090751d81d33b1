"""Opening the node's state (database, object store, registry) from a configuration."""

from __future__ import annotations

from dataclasses import dataclass

import peewee

from node.config import Config
from node.db import open_database
from node.registry import Registry
from node.storage import ObjectStore


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
    # in tmp/ that it is receiving into. The node cleans tmp/ when it starts (node.store.prepare).
    store = ObjectStore(data_dir, fsync=config.storage.fsync)
    db = open_database(config.database_url)
    registry = Registry(store, max_payload=config.models.max_payload_bytes)
    return App(config=config, db=db, store=store, registry=registry)
