"""A workitem's inputs into the node: by C-MOVE to the node's own AE title, or by C-GET.

C-MOVE (the default, ``[[peers]] retrieve = "move"``): the source sends the instances to the
node's Storage SCP, which stores and indexes them as it does any C-STORE, all before the final
C-MOVE response. The source must know the node's AE title, host and port (Orthanc:
``DicomModalities``). C-GET (``retrieve = "get"``): the instances come back on the node's own
association, into a temporary folder, and are stored and indexed from there
(:func:`ingest_file`).

Either way :func:`retrieve` then looks in the index: what counts is what the node holds, not
the sub-operation counts (a C-MOVE repeated after a restart finds duplicates; a source may
answer success having matched nothing). A transient failure (source down, association aborted)
is retried with backoff, ``[ups] retrieve_attempts`` times in all; a definite one (a failure
status, a study the source does not hold) is not.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from node.context import NodeContext
from node.pipeline.arrivals import NOT_IMAGES
from node.scu.client import PeerError, RetryPolicy, fetch
from node.storage import index
from node.storage.db import write_transaction
from node.ups.calling import peer_address, peer_options
from node.ups.workitem import Input

log = logging.getLogger("modelnode.ups")


class RetrieveFailed(Exception):
    """The inputs could not be brought into the node; the message says why."""


@dataclass(frozen=True)
class Retrieved:
    """The image series of one input the node now holds, and what getting them took."""

    study_uid: str
    series_uids: tuple[str, ...]
    instances: int
    seconds: float


def _identifiers(inp: Input) -> list[Dataset]:
    """One STUDY-level identifier, or one SERIES-level identifier per series named."""
    out = []
    for series in inp.series_uids or (None,):
        ident = Dataset()
        ident.StudyInstanceUID = inp.study_uid
        if series is None:
            ident.QueryRetrieveLevel = "STUDY"
        else:
            ident.QueryRetrieveLevel = "SERIES"
            ident.SeriesInstanceUID = series
        out.append(ident)
    return out


def held(inp: Input) -> tuple[tuple[str, ...], int]:
    """(image series UIDs, instances) of ``inp`` in the node's index."""
    q = (index.Series.select(index.Series.id, index.Series.series_uid).join(index.Study)
         .where((index.Study.study_uid == inp.study_uid) & (index.Series.is_model == False)  # noqa: E712
                & (index.Series.modality.not_in(sorted(NOT_IMAGES)))))
    if inp.series_uids:
        q = q.where(index.Series.series_uid.in_(inp.series_uids))
    rows = list(q)
    count = index.Instance.select().where(index.Instance.series.in_([r.id for r in rows])).count() if rows else 0
    return tuple(sorted(r.series_uid for r in rows)), count


def retrieve(ctx: NodeContext, inp: Input) -> Retrieved:
    """Bring ``inp`` into the node (see the module docstring); :class:`RetrieveFailed` if it cannot."""
    cfg = ctx.config
    t0 = time.perf_counter()
    what = f"study {inp.study_uid}" + (f" ({len(inp.series_uids)} series)" if inp.series_uids else "")
    if inp.retrieve_ae:
        ups = cfg.ups
        peer = cfg.peer(inp.retrieve_ae)
        if peer is None:
            raise RetrieveFailed(f"{inp.retrieve_ae!r} is no longer a configured peer")
        address = peer_address(cfg, inp.retrieve_ae)
        options = peer_options(cfg, inp.retrieve_ae, timeout=ups.retrieve_timeout,
                               retry=RetryPolicy(attempts=ups.retrieve_attempts, base_delay=ups.retrieve_base_delay,
                                                 max_delay=ups.retrieve_max_delay))
        how = "C-GET" if peer.retrieve == "get" else "C-MOVE"
        log.info("UPS: retrieving %s from %s by %s", what, address, how)
        for ident in _identifiers(inp):
            try:
                if peer.retrieve == "get":
                    with tempfile.TemporaryDirectory(dir=ctx.app.store.tmp) as tmp:
                        result = fetch(address, identifier=ident, get=True, out_dir=tmp, options=options)
                        for path in result.files:
                            ingest_file(ctx, path, inp.retrieve_ae)
                else:
                    result = fetch(address, identifier=ident, move_to=cfg.node.ae_title, options=options)
            except PeerError as exc:
                tries = f" after {options.retry.attempts} attempt(s)" if exc.transient else ""
                raise RetrieveFailed(f"{how} from {inp.retrieve_ae}{tries}: {exc}") from exc
            if result.failed:
                log.warning("UPS: %s from %s: %d sub-operation(s) failed, %d completed", how, inp.retrieve_ae,
                            result.failed, result.completed)
    series, count = held(inp)
    seconds = time.perf_counter() - t0
    source = inp.retrieve_ae or "the node itself"
    if not series:
        raise RetrieveFailed(f"{source} holds no image of {what}" if inp.retrieve_ae else
                             f"the node holds no image of {what} (Retrieve AE Title is the node's own)")
    missing = sorted(set(inp.series_uids) - set(series))
    if missing:
        raise RetrieveFailed(f"series {', '.join(missing)} of study {inp.study_uid} not found on {source}")
    log.info("UPS: %s in the node: %d series, %d instance(s) (%.2f s)", what, len(series), count, seconds)
    return Retrieved(inp.study_uid, series, count, seconds)


def ingest_file(ctx: NodeContext, path: str | Path, calling_ae: str) -> str:
    """Store and index one received file, as the Storage SCP would; returns its SOP Instance UID.

    Under the node's write lock, like every decision about object files: the file a replaced
    instance pointed at is removed only when no row references it any more.
    """
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    store = ctx.app.store
    stored = store.put_file(path)
    ts = str(ds.file_meta.TransferSyntaxUID)
    with ctx.write_lock:
        if not store.exists(stored.digest):
            stored = store.put_file(path)  # removed meanwhile as the unreferenced twin of ours
        with write_transaction(ctx.app.db):
            _, previous = index.index_instance(ds, digest=stored.digest, size=stored.size, transfer_syntax=ts,
                                               calling_ae=calling_ae)
        if previous is not None and previous.digest != stored.digest and not index.digest_in_use(previous.digest):
            store.remove(previous.digest)
    return str(ds.SOPInstanceUID)
