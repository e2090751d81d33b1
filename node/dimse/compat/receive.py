"""Where pynetdicom's chunked receive writes a dataset, and how a handler finds that file.

With ``_config.STORE_RECV_CHUNKED_DATASET`` pynetdicom 3.0.4 streams each C-STORE dataset into a
file from ``dimse_messages.NamedTemporaryFile``, preceded by a File Meta it builds with two
helpers of the same module. :func:`route_receive_files` points those three names at the node's
own (node.storage.receive: receive files in the object store's ``tmp/``, hashed on their way to
disk, and a File Meta written in one go). The C_STORE primitive then carries the file in two
private attributes, read here by :func:`received_file`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pynetdicom import dimse_messages


def route_receive_files(factory: Callable[..., Any], create_file_meta: Callable[..., Any],
                        write_file_meta_info: Callable[..., Any]) -> None:
    """Receive every C-STORE dataset into a file, through the node's file factory and File Meta.

    Takes effect with ``STORE_RECV_CHUNKED_DATASET``, which :func:`node.dimse.compat.install_server`
    sets.
    """
    dimse_messages.NamedTemporaryFile = factory  # type: ignore[attr-defined]
    dimse_messages.create_file_meta = create_file_meta  # type: ignore[attr-defined]
    dimse_messages.write_file_meta_info = write_file_meta_info  # type: ignore[attr-defined]


def received_file(request: Any) -> tuple[Path | None, Any]:
    """The file a C-STORE request's dataset was received into, and the file object that wrote it.

    ``(None, None)`` when the dataset did not arrive through the chunked receive (an in-memory
    request built by a test or a plugin).
    """
    path = getattr(request, "_dataset_path", None)
    if not isinstance(path, (str, Path)):
        return None, getattr(request, "_dataset_file", None)
    return Path(path), getattr(request, "_dataset_file", None)
