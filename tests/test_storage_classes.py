"""Which SOP classes the Storage SCP accepts: the standard's, retired ones, and unknown ones.

The comparison with Orthanc: dcmtk's storescu sends every file of pydicom-data and of pydicom's
own test files to a real Orthanc (``UnknownSopClassAccepted``) and to the node, and whatever
Orthanc stores the node must store too (bad_sequence.dcm's SOP Instance UID is 64 hexadecimal
digits: stored with a warning, as Orthanc and storescp store it; docs/dimse.md). storescu sends one transfer syntax family per run
(``-xv`` for JPEG 2000 lossless, ...), so each file goes in its own syntax: one storescu per
family and peer, with ``-v`` naming each file's outcome.

A private SOP class (1.2.3.4.5.6) is accepted, stored, and goes back out by C-GET (pynetdicom)
and C-MOVE (to dcmtk's storescp in promiscuous mode); with
``[storage] accept_unknown_sop_classes = false`` its presentation context is rejected (abstract
syntax not supported), and so is a retired class with ``accept_retired_sop_classes = false``.
"""

from __future__ import annotations

import re
import subprocess
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from node_proc import MODELNODE, REPO, NodeProcess, node_process, query
from peers import PEER_ENV, free_port, orthanc, require, run, stop, wait_port
from pydicom.data import data_manager
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

PRIVATE_CLASS = "1.2.3.4.5.6"
US_RETIRED = "1.2.840.10008.5.1.4.1.1.6"  # Ultrasound Image Storage (Retired): color-pl.dcm, color-px.dcm
ABSTRACT_SYNTAX_NOT_SUPPORTED = 0x03
VERIFICATION = "1.2.840.10008.1.1"

# storescu's option that proposes a transfer syntax (with the uncompressed ones); others: -x=.
STORESCU_SYNTAX_FLAG = {
    "1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.91": "-xw", "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.50": "-xy", "1.2.840.10008.1.2.4.51": "-xx", "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu", "1.2.840.10008.1.2.5": "-xr", "1.2.840.10008.1.2.1.99": "-xd",
}


# --------------------------------------------------------------------------- helpers


def real_files() -> list[Path]:
    """pydicom-data's files and pydicom's own test files, as installed (nothing downloaded)."""
    external = Path(data_manager.external_data_sources()["pydicom-data"].data_path)
    own = Path(pydicom.__file__).parent / "data" / "test_files"
    return sorted(external.glob("*.dcm")) + sorted(own.glob("*.dcm"))


def by_storescu_flag(files: list[Path]) -> dict[str, list[Path]]:
    groups: dict[str, list[Path]] = {}
    for path in files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # some are broken on purpose; storescu judges them
                ts = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        except Exception:  # no File Meta, or not DICOM: storescu decides what to do with it
            ts = ""
        groups.setdefault(STORESCU_SYNTAX_FLAG.get(ts, "-x="), []).append(path)
    return groups


def storescu_outcomes(text: str) -> dict[str, str]:
    """{file: outcome} from ``storescu -v``: the response status, or FAILED (not sent)."""
    outcomes: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        sending = re.match(r"I: Sending file: (.*)$", line)
        if sending:
            current = sending.group(1)
            outcomes[current] = "?"
        elif current and "Received Store Response" in line:
            outcomes[current] = line.split("Received Store Response", 1)[1].strip()
        elif current and line.startswith("E: Store Failed"):
            outcomes[current] = "FAILED"
    return outcomes


def send_all(aet: str, port: int, groups: dict[str, list[Path]]) -> dict[str, str]:
    outcomes: dict[str, str] = {}
    for flag, files in groups.items():
        res = run([require("storescu"), "-v", "-R", "-nh", flag, "-aec", aet, "127.0.0.1", str(port),
                   *map(str, files)], timeout=120, check=False)
        outcomes.update(storescu_outcomes(res.stdout + res.stderr))
    return outcomes


def stored(outcomes: dict[str, str]) -> set[str]:
    return {f for f, o in outcomes.items() if o.startswith(("(Success", "(Warning"))}




def private_dataset() -> Dataset:
    """An instance of a private SOP class: the identifiers the index needs, and private data."""
    ds = Dataset()
    uid = generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = PRIVATE_CLASS, uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = PRIVATE_CLASS, uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "PRIV001", "PRIVATE^CLASS", "OT"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    block = ds.private_block(0x0029, "MODELNODE TEST", create=True)
    block.add_new(0x01, "OB", b"vendor data\x00")
    return ds


@contextmanager
def association(node: NodeProcess, contexts: list[tuple[str, str]], **kw) -> Iterator:
    from pynetdicom import AE

    ae = AE("PNSCU")
    for sop_class, ts in contexts:
        ae.add_requested_context(sop_class, [ts])
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title, **kw)
    try:
        assert assoc.is_established, "association not accepted"
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def context_results(node: NodeProcess, sop_class: str) -> tuple[bool, int | None]:
    """Propose Verification and ``sop_class``: (accepted, result of the rejection or None)."""
    with association(node, [(VERIFICATION, ExplicitVRLittleEndian), (sop_class, ExplicitVRLittleEndian)]) as assoc:
        accepted = any(str(cx.abstract_syntax) == sop_class for cx in assoc.accepted_contexts)
        rejected = [cx.result for cx in assoc.rejected_contexts if str(cx.abstract_syntax) == sop_class]
        return accepted, (rejected[0] if rejected else None)


@contextmanager
def storescp(workdir: Path, aet: str = "STORESCP") -> Iterator[tuple[int, Path]]:
    """dcmtk's storescp in promiscuous mode (it stores unknown SOP classes too)."""
    out = workdir / "received"
    out.mkdir(parents=True)
    port = free_port()
    with open(workdir / "storescp.log", "wb") as log:
        proc = subprocess.Popen([require("storescp"), "-pm", "-aet", aet, "-od", str(out), str(port)],
                                stdout=log, stderr=subprocess.STDOUT, env=PEER_ENV)
    try:
        wait_port(port, 20, proc)
        yield port, out
    finally:
        stop(proc)


# --------------------------------------------------------------------------- against Orthanc


@pytest.mark.peers
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_node_stores_every_real_file_orthanc_stores(tmp_path: Path) -> None:
    files = real_files()
    assert len(files) > 100, "pydicom-data is missing (pip install pydicom-data: the test extra)"
    groups = by_storescu_flag(files)
    t0 = time.monotonic()
    with orthanc(tmp_path / "orthanc") as pacs:
        by_orthanc = send_all(pacs.aet, pacs.port, groups)
    with node_process(tmp_path / "node", storage={"fsync": False}, extra={"pipeline": {"enabled": False}}) as node:
        by_node = send_all(node.ae_title, node.port, groups)
        log = node.log()
    took = time.monotonic() - t0

    orthanc_ok, node_ok = stored(by_orthanc), stored(by_node)
    print(f"\n{len(files)} files: Orthanc stored {len(orthanc_ok)}, the node {len(node_ok)} "
          f"(node only: {sorted(Path(f).name for f in node_ok - orthanc_ok)}) in {took:.1f} s")
    missing = orthanc_ok - node_ok
    assert not missing, {Path(f).name: by_node.get(f) for f in missing}
    assert any(Path(f).name == "bad_sequence.dcm" for f in node_ok)  # its UID: 64 hex digits
    assert "the SOP Instance UID is not a valid UID (PS3.5 9.1); stored as received" in log
    for name in ("color-pl.dcm", "color-px.dcm"):  # Ultrasound Image Storage (Retired)
        assert any(Path(f).name == name for f in node_ok), name
    assert "Traceback" not in log


# --------------------------------------------------------------------------- a private SOP class


@pytest.mark.peers
@pytest.mark.timeout(90)
def test_a_private_sop_class_is_stored_and_goes_back_out(tmp_path: Path) -> None:
    from pynetdicom import build_role, evt, register_uid
    from pynetdicom.service_class import StorageServiceClass
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet, uid_to_service_class

    # This process receives the C-GET's C-STOREs: its own pynetdicom must know the class too.
    if uid_to_service_class(PRIVATE_CLASS) is not StorageServiceClass:
        register_uid(PRIVATE_CLASS, "ModelnodeTestPrivateStorage", StorageServiceClass)
    ds = private_dataset()
    with storescp(tmp_path / "scp") as (scp_port, received):
        peers = [{"ae_title": "STORESCP", "host": "127.0.0.1", "port": scp_port}]
        with node_process(tmp_path / "node", peers=peers, storage={"fsync": False}) as node:
            with association(node, [(PRIVATE_CLASS, ExplicitVRLittleEndian)]) as assoc:
                status = assoc.send_c_store(ds)
                assert status and status.Status == 0x0000, status
            assert query(node, "SELECT sop_class_uid, transfer_syntax FROM instance WHERE sop_uid = ?",
                         ds.SOPInstanceUID) == [(PRIVATE_CLASS, ExplicitVRLittleEndian)]
            assert f"accepting unknown SOP class {PRIVATE_CLASS}" in node.log()

            # C-GET: back over the requestor's association, on the private class's context.
            got: list[Dataset] = []

            def on_store(event) -> int:
                got.append(event.dataset)
                return 0x0000

            identifier = Dataset()
            identifier.QueryRetrieveLevel = "IMAGE"
            identifier.StudyInstanceUID, identifier.SeriesInstanceUID = ds.StudyInstanceUID, ds.SeriesInstanceUID
            identifier.SOPInstanceUID = ds.SOPInstanceUID
            contexts = [(StudyRootQueryRetrieveInformationModelGet, ExplicitVRLittleEndian),
                        (PRIVATE_CLASS, ExplicitVRLittleEndian)]
            with association(node, contexts, ext_neg=[build_role(PRIVATE_CLASS, scp_role=True)],
                             evt_handlers=[(evt.EVT_C_STORE, on_store)]) as assoc:
                statuses = [s.Status for s, _ in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet)]
            assert statuses[-1] == 0x0000, [hex(s) for s in statuses]
            assert len(got) == 1 and got[0].SOPClassUID == PRIVATE_CLASS
            assert got[0][0x00291001].value == b"vendor data\x00"

            # C-MOVE to a configured peer: the node proposes the stored class itself.
            run([require("movescu"), "-S", "-aec", node.ae_title, "-aem", "STORESCP", "-k", "QueryRetrieveLevel=IMAGE",
                 "-k", f"StudyInstanceUID={ds.StudyInstanceUID}", "-k", f"SeriesInstanceUID={ds.SeriesInstanceUID}",
                 "-k", f"SOPInstanceUID={ds.SOPInstanceUID}", "127.0.0.1", str(node.port)])
    [moved] = [p for p in received.iterdir() if p.is_file()]
    back = pydicom.dcmread(moved)
    assert (back.SOPClassUID, back.SOPInstanceUID) == (PRIVATE_CLASS, ds.SOPInstanceUID)
    assert back[0x00291001].value == b"vendor data\x00"


@pytest.mark.timeout(60)
def test_switched_off_unknown_and_retired_classes_are_rejected_at_negotiation(tmp_path: Path) -> None:
    with node_process(tmp_path / "on") as node:
        assert context_results(node, PRIVATE_CLASS) == (True, None)
        assert context_results(node, US_RETIRED) == (True, None)
        # A known service the node does not offer is not taken for an unknown storage class.
        assert context_results(node, "1.2.840.10008.5.1.4.31") == (False, ABSTRACT_SYNTAX_NOT_SUPPORTED)
    storage = {"accept_unknown_sop_classes": False, "accept_retired_sop_classes": False}
    with node_process(tmp_path / "off", storage=storage) as node:
        assert context_results(node, PRIVATE_CLASS) == (False, ABSTRACT_SYNTAX_NOT_SUPPORTED)
        assert context_results(node, US_RETIRED) == (False, ABSTRACT_SYNTAX_NOT_SUPPORTED)
        assert context_results(node, "1.2.840.10008.5.1.4.1.1.2") == (True, None)  # CT, as ever
    with node_process(tmp_path / "retired-off", storage={"accept_retired_sop_classes": False}) as node:
        # pydicom knows the retired class, so it is not "unknown" either.
        assert context_results(node, US_RETIRED) == (False, ABSTRACT_SYNTAX_NOT_SUPPORTED)
        assert context_results(node, PRIVATE_CLASS) == (True, None)


# --------------------------------------------------------------------------- in process


@pytest.mark.timeout(30)
def test_the_lists_cover_every_storage_class_pydicom_knows() -> None:
    from pydicom._uid_dict import UID_dictionary  # the whole dictionary: only a test reads it
    from pydicom.uid import UID
    from pynetdicom.presentation import AllStoragePresentationContexts
    from pynetdicom.service_class import ServiceClass
    from pynetdicom.sop_class import uid_to_service_class

    from node.dimse import sop_classes

    pynetdicom_list = {str(cx.abstract_syntax) for cx in AllStoragePresentationContexts}
    retired, other = sop_classes.RETIRED_STORAGE_SOP_CLASSES, sop_classes.OTHER_STANDARD_STORAGE_SOP_CLASSES
    assert all(UID(u).is_retired for u in retired)
    assert not any(UID(u).is_retired for u in other)
    ours = set(retired) | set(other)
    assert not ours & pynetdicom_list
    left_out = {"1.2.840.10008.1.3.10", "1.2.840.10008.1.20.2"}  # Media Storage Directory; Storage Commitment Pull
    # Storage classes pydicom knows, pynetdicom does not list and serves with no other service
    # class (Hanging Protocol, Color Palette ... are its Non-Patient Object Storage).
    lacking = {u for u, (name, kind, *_rest) in UID_dictionary.items()
               if kind == "SOP Class" and "Storage" in name and u not in pynetdicom_list | ours
               and uid_to_service_class(u) is ServiceClass}
    assert lacking == left_out, sorted(lacking ^ left_out)
    assert len(sop_classes.storage_sop_classes(retired=False)) == 170 + len(other)
    assert len(sop_classes.storage_sop_classes()) == 170 + len(ours)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("key", ["accept_unknown_sop_classes", "accept_retired_sop_classes"])
def test_storage_switches_must_be_booleans(tmp_path: Path, key: str) -> None:
    cfg = tmp_path / "modelnode.toml"
    cfg.write_text(f'[storage]\n{key} = "no"\n')
    res = subprocess.run([*MODELNODE, "config", "check", str(cfg)], capture_output=True, text=True, timeout=60,
                         cwd=REPO)
    assert res.returncode == 3 and f"storage.{key}: must be bool" in res.stdout + res.stderr, res.stderr
