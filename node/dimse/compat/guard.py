"""Version check and attribute probes for the pynetdicom internals modelnode relies on.

Each probe names one private attribute that a patch replaces or reads. They are checked on the
library's classes and, for attributes that only exist on instances, on an acceptor
:class:`~pynetdicom.association.Association` that is built but never started (no socket, no
thread). A missing name would otherwise surface as an ``AttributeError`` on the network thread
of the first C-STORE, which pynetdicom turns into an aborted association with no useful log line.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

# The pynetdicom release whose internals node.dimse.compat replaces; setup.cfg pins the same.
PYNETDICOM_VERSION = "3.0.4"


class IncompatibleLibrary(RuntimeError):
    """The installed pynetdicom is not the one modelnode's patches were written for."""


# Module-level names, as "module:attribute.path".
_MODULE_ATTRIBUTES = (
    "pynetdicom:__version__",
    "pynetdicom._config:STORE_RECV_CHUNKED_DATASET",
    "pynetdicom._config:STORE_SEND_CHUNKED_DATASET",
    "pynetdicom._handlers:standard_pdu_recv_handler",
    "pynetdicom._handlers:standard_pdu_sent_handler",
    "pynetdicom._handlers:standard_dimse_recv_handler",
    "pynetdicom._handlers:standard_dimse_sent_handler",
    "pynetdicom._handlers:_recv_n_get_rq",
    "pynetdicom.dul:time",
    "pynetdicom.dul:DULServiceProvider.send_pdu",
    "pynetdicom.dul:DULServiceProvider._read_pdu_data",
    "pynetdicom.dul:DULServiceProvider._process_recv_primitive",
    "pynetdicom.dul:DULServiceProvider._decode_pdu",
    "pynetdicom.association:time",
    "pynetdicom.association:Association._serve_request",
    "pynetdicom.association:Association._run_reactor",
    "pynetdicom.transport:deepcopy",
    "pynetdicom.transport:AssociationSocket.recv",
    "pynetdicom.transport:AssociationSocket.ready",
    "pynetdicom.dimse:DIMSEServiceProvider.receive_primitive",
    "pynetdicom.dimse:DIMSEServiceProvider.send_msg",
    "pynetdicom.dimse_messages:NamedTemporaryFile",
    "pynetdicom.dimse_messages:create_file_meta",
    "pynetdicom.dimse_messages:write_file_meta_info",
    "pynetdicom.dimse_primitives:C_STORE._context_id",
    "pynetdicom.dimse_primitives:C_STORE._dataset_path",
    "pynetdicom.dimse_primitives:C_STORE._dataset_file",
    "pynetdicom._config:LOG_RESPONSE_IDENTIFIERS",
    "pynetdicom.service_class:encode",
    "pynetdicom.service_class:ServiceClass._c_find_scp",
    "pynetdicom.transport:AssociationSocket.send",
    "pynetdicom.dimse:DIMSEServiceProvider.maximum_pdu_size",
)

# Names that exist only on instances: read from an acceptor association that is never started,
# and from an empty presentation context.
_INSTANCE_ATTRIBUTES = (
    "PresentationContext._transfer_syntax",
    "Association._kill",
    "Association._is_paused",
    "Association._reactor_checkpoint",
    "Association._accepted_cx",
    "Association.dimse.msg_queue",
    "Association.dimse.message",
    "Association.dul._idle_timer.timeout",
    "Association.dul._idle_timer.restart",
    "Association.dul._kill_thread",
    "Association.dul._recv_pdu",
    "Association.dul.to_provider_queue",
    "Association.dul.socket",
    "Association.dimse.cancel_req",
    "Association.dul.to_user_queue",
    "Association.dul.event_queue",
    "Association.dul.state_machine.current_state",
)

_MISSING = object()
# Set once check() has passed in this process: the probes cost ~0.3 s of imports the first time,
# and tests build many nodes.
_passed = False


def _resolve(root: Any, path: str) -> Any:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, _MISSING)
        if obj is _MISSING:
            return _MISSING
    return obj


def _module_probe(spec: str) -> Callable[[], bool]:
    module_name, path = spec.split(":")

    def probe() -> bool:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            return False
        return _resolve(module, path) is not _MISSING

    return probe


def _probe_instances() -> dict[str, Any]:
    from pynetdicom import AE
    from pynetdicom.association import Association
    from pynetdicom.presentation import PresentationContext

    return {"Association": Association(AE(), "acceptor"), "PresentationContext": PresentationContext()}


def missing_attributes() -> list[str]:
    """The probed names the installed pynetdicom lacks, as ``module:attribute`` strings."""
    missing = [spec for spec in _MODULE_ATTRIBUTES if not _module_probe(spec)()]
    try:
        instances = _probe_instances()
    except Exception as exc:  # a changed constructor is as fatal as a missing attribute
        return [*missing, f"pynetdicom: cannot build the probe instances ({type(exc).__name__}: {exc})"]
    for spec in _INSTANCE_ATTRIBUTES:
        cls, path = spec.split(".", 1)
        if _resolve(instances[cls], path) is _MISSING:
            missing.append(f"pynetdicom: {spec} (on an instance)")
    return missing


def check() -> None:
    """Raise :class:`IncompatibleLibrary` unless pynetdicom is the pinned version with every name.

    The message names the installed version and each missing attribute, for the log of a node
    that refuses to start.
    """
    global _passed
    if _passed:
        return
    import pynetdicom

    version = getattr(pynetdicom, "__version__", "unknown")
    if version != PYNETDICOM_VERSION:
        raise IncompatibleLibrary(
            f"pynetdicom {version} is installed, but modelnode replaces internals of pynetdicom "
            f"{PYNETDICOM_VERSION} only (its DUL reactor, C-STORE message path and receive files); "
            f"install the pinned version: pip install 'pynetdicom=={PYNETDICOM_VERSION}'"
        )
    missing = missing_attributes()
    if missing:
        raise IncompatibleLibrary(
            f"pynetdicom {version} lacks {len(missing)} attribute(s) that modelnode replaces or "
            f"reads: {', '.join(missing)}; reinstall it: pip install --force-reinstall "
            f"'pynetdicom=={PYNETDICOM_VERSION}'"
        )
    _passed = True
