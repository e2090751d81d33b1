"""Query/retrieve against the node as a real process, driven by dcmtk's findscu, movescu and getscu.

One node serves the whole module (started once, seeded once): synthetic patients whose attributes
exercise each PS3.4 C.2.2.2 matching type, real files from pydicom's test data and pydicom-data in
every transfer syntax (for byte-for-byte round trips), a model object, and 3000 index rows for
C-CANCEL. Move destinations are dcmtk's movescu receiver and storescp, and a pynetdicom SCP that
accepts some SOP classes only (partial failures).
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from cards import segmentation_card_dict
from node_proc import MODELNODE, REPO, NodeProcess, node_process
from onnx_factory import segmentation_model
from peers import free_port, require, run, stop, wait_port
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.dsutils import split_dataset

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
US = "1.2.840.10008.5.1.4.1.1.6.1"
ALWAYS = {(0x0008, 0x0005), (0x0008, 0x0052), (0x0008, 0x0054)}  # charset, level, retrieve AE

# Real files nobody here wrote, in their own transfer syntaxes, with the getscu option that makes
# getscu prefer that syntax for what it receives (None: getscu cannot ask for it; dcmtk 3.6.7's
# getscu +xi proposes Explicit VR Little Endian only).
REAL_FILES = [
    ("CT_small.dcm", "+xe"),  # Explicit VR Little Endian
    ("MR_small_implicit.dcm", None),  # Implicit VR Little Endian
    ("693_UNCI.dcm", "+xe"),  # pydicom-data; carries group lengths that pydicom drops when it re-encodes
    ("SC_rgb_jpeg_dcmtk.dcm", "+xy"),  # JPEG Baseline
    ("JPGLosslessP14SV1_1s_1f_8b.dcm", "+xs"),  # pydicom-data, JPEG Lossless SV1
    ("emri_small_jpeg_ls_lossless.dcm", "+xt"),  # pydicom-data, JPEG-LS Lossless
    ("693_J2KR.dcm", "+xv"),  # pydicom-data, JPEG 2000 Lossless
    ("JPEG2000.dcm", "+xw"),  # JPEG 2000
    ("rtdose_rle.dcm", "+xr"),  # RLE Lossless
    ("explicit_VR-UN.dcm", "+xv"),  # pydicom-data, JPEG 2000 Lossless with UN elements pydicom would retype
]


def body(path: Path) -> tuple[str, bytes]:
    """(transfer syntax, the dataset bytes after the File Meta): what must survive a round trip."""
    meta, offset = split_dataset(Path(path))
    return str(meta.TransferSyntaxUID), Path(path).read_bytes()[offset:]


def synthetic(path: Path, sop_class: str, **attrs: object) -> Path:
    """A small image with the given attributes (enough for the index; pixel data 2x2)."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = attrs.pop("SOPInstanceUID", generate_uid())
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 2, 2, 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = b"\x00\x01\x02\x03"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


@dataclass
class Env:
    node: NodeProcess
    work: Path
    ports: dict[str, int]
    uids: dict[str, str]
    real: dict[str, Path]  # file name -> original path
    real_uids: dict[str, str]  # file name -> SOP Instance UID
    model_uid: str
    model_onnx: bytes
    bulk_series: str


PATIENTS = [
    # key, PatientName, PatientID, StudyDate, StudyTime, series: (modality, body part, description, class, n)
    ("A", "Doe^John", "PID001", "20200115", "093000", "ACC1",
     [("CT", "CHEST", "Thorax 1mm", CT, 3), ("MR", "HEAD", "Brain T1", MR, 1)]),
    ("B", "DOE^Jane", "PID002", "20201231", "235959", "ACC2", [("CT", "ABDOMEN", "Abdomen 5mm", CT, 2)]),
    ("C", "Smith^Anna", "PID003", "20210601", "101010.5", "ACC3", [("US", "", "Liver", US, 1)]),
    ("D", "Müller^Jörg", "PID004", "", "", "ACC4", [("CT", "CHEST", "Lunge", CT, 1)]),
]


def _seed_synthetic(work: Path) -> tuple[list[Path], dict[str, str]]:
    out = work / "synthetic"
    out.mkdir()
    files, uids = [], {}
    for key, name, pid, date, time_, acc, series in PATIENTS:
        study_uid = generate_uid()
        uids[f"study{key}"] = study_uid
        for s_no, (modality, body_part, desc, sop_class, count) in enumerate(series, 1):
            series_uid = generate_uid()
            uids[f"series{key}{s_no}"] = series_uid
            for i in range(1, count + 1):
                sop_uid = generate_uid()
                uids[f"sop{key}{s_no}_{i}"] = sop_uid
                attrs = dict(PatientName=name, PatientID=pid, StudyInstanceUID=study_uid, StudyDate=date,
                             StudyTime=time_, AccessionNumber=acc, StudyID=key, StudyDescription=f"Study {key}",
                             SeriesInstanceUID=series_uid, SeriesNumber=s_no, Modality=modality,
                             SeriesDescription=desc, InstanceNumber=i, SOPInstanceUID=sop_uid,
                             SpecificCharacterSet="ISO_IR 192")
                if body_part:
                    attrs["BodyPartExamined"] = body_part
                files.append(synthetic(out / f"{sop_uid}.dcm", sop_class, **attrs))
    return files, uids


def _seed_bulk(node: NodeProcess, n: int) -> str:
    """``n`` index rows in one series (no files: only C-FIND reads them) for the C-CANCEL test."""
    from node.storage.db import open_database
    from node.storage.index import Instance, Patient, Series, Study

    db = open_database(f"sqlite:///{node.data_dir / 'modelnode.db'}")
    try:
        with db.atomic():
            patient = Patient.create(patient_id="BULK", patient_name="Bulk^Cancel")
            study = Study.create(study_uid=generate_uid(), patient=patient, study_date="20190101")
            series = Series.create(series_uid=generate_uid(), study=study, modality="OT")
            rows = [{"sop_uid": generate_uid(), "series": series.id, "sop_class_uid": CT, "instance_number": i,
                     "transfer_syntax": ExplicitVRLittleEndian, "digest": "0" * 64, "size": 0} for i in range(n)]
            for i in range(0, n, 500):
                Instance.insert_many(rows[i : i + 500]).execute()
        return series.series_uid
    finally:
        db.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    from iods import model_object
    from iods.card import parse_card
    from node.scu import client as scu

    for tool in ("findscu", "movescu", "getscu", "storescu", "storescp"):
        require(tool)
    work = tmp_path_factory.mktemp("qr")
    ports = {name: free_port() for name in ("MOVESCU", "STORESCP", "PICKY", "NOTHING", "NOBODY")}
    peers = [{"ae_title": ae, "host": "127.0.0.1", "port": port} for ae, port in ports.items()]
    with node_process(work / "node", peers=peers, storage={"fsync": False}) as node:
        files, uids = _seed_synthetic(work)
        real = {name: Path(get_testdata_file(name)) for name, _ in REAL_FILES}
        peer = scu.Address(node.ae_title, "127.0.0.1", node.port)
        results = scu.store([*files, *real.values()], peer)
        assert all(r.status == 0 for r in results), [(r.path.name, r.status, r.error) for r in results if r.status != 0]
        real_uids = {name: str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for name, p in real.items()}
        onnx_bytes = segmentation_model()
        model_path = work / "model.dcm"
        model_object.write(model_object.encode(onnx_bytes, parse_card(segmentation_card_dict())), model_path)
        run(["storescu", "-aec", node.ae_title, "127.0.0.1", str(node.port), str(model_path)])
        model_uid = str(pydicom.dcmread(model_path, stop_before_pixels=True).SOPInstanceUID)
        bulk = _seed_bulk(node, 3000)
        yield Env(node, work, ports, uids, real, real_uids, model_uid, onnx_bytes, bulk)


def findscu(env: Env, *keys: str, root: str = "-S", extra: tuple[str, ...] = ()) -> tuple[list[Dataset], str]:
    """Run findscu; return the response identifiers (extracted by findscu itself) and its log."""
    out = env.work / f"find-{time.monotonic_ns()}"
    out.mkdir()
    args = ["findscu", "-v", root, "-aec", env.node.ae_title, "-X", "-od", str(out), *extra, "127.0.0.1",
            str(env.node.port)]
    for k in keys:
        args += ["-k", k]
    res = run(args, check=False)
    assert res.returncode == 0, res.stderr
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))], res.stderr


def values(responses: list[Dataset], keyword: str) -> list[str]:
    return [str(r.get(keyword, "")) for r in responses]


# --------------------------------------------------------------------------- C-FIND


@pytest.mark.timeout(60)
def test_find_each_level_in_both_roots(env: Env) -> None:
    rsp, _ = findscu(env, "QueryRetrieveLevel=PATIENT", "PatientName", "PatientID", "NumberOfPatientRelatedStudies",
                     "NumberOfPatientRelatedInstances", root="-P")
    by_id = {r.PatientID: r for r in rsp}
    assert {"PID001", "PID002", "PID003", "PID004", "MODELNODE-MODEL-LIBRARY", "BULK"} <= set(by_id)
    assert by_id["PID001"].PatientName == "Doe^John"
    assert by_id["PID001"].NumberOfPatientRelatedStudies == 1
    assert by_id["PID001"].NumberOfPatientRelatedInstances == 4
    assert by_id["PID004"].PatientName == "Müller^Jörg"  # UTF-8 (ISO_IR 192) end to end

    # Patient Root, STUDY level under a patient (the parent's unique key narrows the query).
    rsp, _ = findscu(env, "QueryRetrieveLevel=STUDY", "PatientID=PID001", "StudyInstanceUID", "ModalitiesInStudy",
                     "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", root="-P")
    assert values(rsp, "StudyInstanceUID") == [env.uids["studyA"]]
    assert list(rsp[0].ModalitiesInStudy) == ["CT", "MR"]
    assert (rsp[0].NumberOfStudyRelatedSeries, rsp[0].NumberOfStudyRelatedInstances) == (2, 4)

    # Study Root: STUDY, SERIES (ordered by series number) and IMAGE (ordered by instance number).
    rsp, _ = findscu(env, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={env.uids['studyB']}", "PatientName",
                     "StudyDate", "AccessionNumber")
    assert [(str(r.PatientName), r.StudyDate, r.AccessionNumber) for r in rsp] == [("DOE^Jane", "20201231", "ACC2")]
    rsp, _ = findscu(env, "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={env.uids['studyA']}", "SeriesInstanceUID",
                     "Modality", "SeriesNumber", "NumberOfSeriesRelatedInstances")
    assert [(r.Modality, r.SeriesNumber, r.NumberOfSeriesRelatedInstances) for r in rsp] == [("CT", 1, 3), ("MR", 2, 1)]
    rsp, _ = findscu(env, "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={env.uids['studyA']}",
                     f"SeriesInstanceUID={env.uids['seriesA1']}", "SOPInstanceUID", "InstanceNumber", "SOPClassUID",
                     "AvailableTransferSyntaxUID")
    assert values(rsp, "SOPInstanceUID") == [env.uids[f"sopA1_{i}"] for i in (1, 2, 3)]
    assert set(values(rsp, "SOPClassUID")) == {CT}
    assert set(values(rsp, "AvailableTransferSyntaxUID")) == {ExplicitVRLittleEndian}
    # Patient Root IMAGE level works too.
    rsp, _ = findscu(env, "QueryRetrieveLevel=IMAGE", f"SOPInstanceUID={env.real_uids['693_J2KR.dcm']}",
                     "AvailableTransferSyntaxUID", root="-P")
    assert values(rsp, "AvailableTransferSyntaxUID") == ["1.2.840.10008.1.2.4.90"]


@pytest.mark.timeout(60)
def test_find_matching_types(env: Env) -> None:
    def studies(*keys: str) -> list[str]:
        rsp, _ = findscu(env, "QueryRetrieveLevel=STUDY", "StudyID", "PatientID=PID*", *keys)
        return sorted(values(rsp, "StudyID"))

    def series(*keys: str) -> list[str]:
        rsp, _ = findscu(env, "QueryRetrieveLevel=SERIES", "SeriesDescription", "PatientID=PID*", *keys)
        return sorted(values(rsp, "SeriesDescription"))

    # Single value: exact, case-sensitive; PN case-insensitive.
    assert studies("AccessionNumber=ACC3") == ["C"]
    assert studies("AccessionNumber=acc3") == []
    assert studies("PatientName=doe^john") == ["A"]
    assert studies("SpecificCharacterSet=ISO_IR 192", "PatientName=MÜLLER^JÖRG") == ["D"]
    assert series("Modality=MR") == ["Brain T1"]
    assert series("Modality=mr") == []
    # Wildcards * and ?; other SQL metacharacters are literal.
    assert studies("PatientName=DOE*") == ["A", "B"]
    assert studies("PatientName=Do?^J*") == ["A", "B"]
    assert series("SeriesDescription=*mm") == ["Abdomen 5mm", "Thorax 1mm"]
    assert series("SeriesDescription=Thorax_1mm") == []
    assert series("SeriesDescription=%") == []
    # UID list.
    assert studies(f"StudyInstanceUID={env.uids['studyA']}\\{env.uids['studyC']}") == ["A", "C"]
    # Ranges on DA and TM; an empty date never matches a range.
    assert studies("StudyDate=20200101-20201231") == ["A", "B"]
    assert studies("StudyDate=20201231-") == ["B", "C"]
    assert studies("StudyDate=-20200630") == ["A"]
    assert studies("StudyDate=20201231") == ["B"]
    assert studies("StudyTime=0900-1015") == ["A", "C"]
    assert studies("StudyTime=10") == ["C"]
    # Universal: empty value matches everything and returns it.
    rsp, _ = findscu(env, "QueryRetrieveLevel=STUDY", "PatientID=PID*", "StudyDate")
    assert sorted(values(rsp, "StudyDate")) == ["", "20200115", "20201231", "20210601"]
    # Relational: a patient key at SERIES level, multiple values on a CS key, ModalitiesInStudy.
    assert series("PatientName=Smith*") == ["Liver"]
    assert series("Modality=US\\MR") == ["Brain T1", "Liver"]
    assert studies("ModalitiesInStudy=MR") == ["A"]


@pytest.mark.timeout(60)
def test_find_returns_requested_keys_only(env: Env) -> None:
    rsp, _ = findscu(env, "QueryRetrieveLevel=SERIES", f"SeriesInstanceUID={env.uids['seriesA1']}", "Modality",
                     "SeriesDescription", "PatientName", "ImageComments", "SOPInstanceUID")
    assert len(rsp) == 1
    tags = {(e.tag.group, e.tag.element) for e in rsp[0]}
    requested = {(0x0020, 0x000E), (0x0008, 0x0060), (0x0008, 0x103E), (0x0010, 0x0010), (0x0020, 0x4000),
                 (0x0008, 0x0018)}
    assert tags == requested | ALWAYS
    r = rsp[0]
    assert (r.Modality, r.SeriesDescription, str(r.PatientName)) == ("CT", "Thorax 1mm", "Doe^John")
    assert r.ImageComments in ("", None) and r.SOPInstanceUID in ("", None)  # not indexed / lower level: empty
    assert (r.QueryRetrieveLevel, r.RetrieveAETitle) == ("SERIES", env.node.ae_title)


@pytest.mark.timeout(60)
def test_find_models_by_standard_and_coded_keys(env: Env) -> None:
    # The example, verbatim.
    rsp, _ = findscu(env, "QueryRetrieveLevel=SERIES", "Modality=CT", "BodyPartExamined=CHEST", "SeriesDescription")
    assert sorted(values(rsp, "SeriesDescription")) == ["Lunge", "Thorax 1mm", "test-lung-seg 1.0.0"]
    for r in rsp:
        assert {(e.tag.group, e.tag.element) for e in r} == {(0x0008, 0x0060), (0x0018, 0x0015), (0x0008, 0x103E)} | ALWAYS

    # Coded anatomy (SNOMED CT 39607008 Lung) in the Acquisition Context Sequence: only the model.
    rsp, _ = findscu(env, "QueryRetrieveLevel=SERIES", "SeriesDescription",
                     "AcquisitionContextSequence[0].ConceptCodeSequence[0].CodeValue=39607008")
    assert values(rsp, "SeriesDescription") == ["test-lung-seg 1.0.0"]
    items = rsp[0].AcquisitionContextSequence
    assert [i.ConceptCodeSequence[0].CodeValue for i in items] == ["39607008"]
    assert set(items[0].ConceptCodeSequence[0].keys()) == {0x00080100}  # only the requested sub-key
    # The alias, and a finding restricted by its concept name (DCM 121071 Finding).
    rsp, _ = findscu(env, "QueryRetrieveLevel=SERIES", "SeriesDescription", "AnatomicRegionSequence[0].CodeValue=39607008",
                     "AnatomicRegionSequence[0].CodeMeaning")
    assert values(rsp, "SeriesDescription") == ["test-lung-seg 1.0.0"]
    assert rsp[0].AnatomicRegionSequence[0].CodeMeaning == "Lung"
    finding = ("AcquisitionContextSequence[0].ConceptNameCodeSequence[0].CodeValue={}",
               "AcquisitionContextSequence[0].ConceptCodeSequence[0].CodeValue=27925004")
    rsp, _ = findscu(env, "QueryRetrieveLevel=SERIES", "SeriesDescription", finding[0].format("121071"), finding[1])
    assert values(rsp, "SeriesDescription") == ["test-lung-seg 1.0.0"]
    rsp, _ = findscu(env, "QueryRetrieveLevel=SERIES", "SeriesDescription", finding[0].format("123014"), finding[1])
    assert rsp == []  # a nodule is a finding, not a target region
    rsp, _ = findscu(env, "QueryRetrieveLevel=SERIES", "SeriesDescription",
                     "AcquisitionContextSequence[0].ConceptCodeSequence[0].CodeValue=12345678")
    assert rsp == []
    # Universal sequence key: every item comes back in full.
    rsp, _ = findscu(env, "QueryRetrieveLevel=IMAGE", f"SOPInstanceUID={env.model_uid}", "AcquisitionContextSequence")
    codes = {(i.ConceptNameCodeSequence[0].CodeValue, i.ConceptCodeSequence[0].CodeValue)
             for i in rsp[0].AcquisitionContextSequence}
    assert codes == {("123014", "39607008"), ("123014", "51185008"), ("121071", "27925004")}


@pytest.mark.timeout(60)
def test_find_refuses_unsupported_levels_and_keeps_serving(env: Env) -> None:
    from node.scu import client as scu

    peer = scu.Address(env.node.ae_title, "127.0.0.1", env.node.port)
    for level, model in (("PATIENT", "study"), ("FOO", "study"), ("", "patient")):
        ident = Dataset()
        ident.QueryRetrieveLevel = level
        ident.PatientName = ""
        with pytest.raises(scu.QueryFailed) as info:
            scu.find(peer, ident, model=model, options=scu.Options(retry=scu.NO_RETRY))
        assert info.value.status == 0xA900
    _, log = findscu(env, "QueryRetrieveLevel=PATIENT", "PatientName")
    assert "DataSetDoesNotMatchSOPClass" in log
    assert "PATIENT level is not part of the Study Root model" in env.node.log()
    assert "unsupported QueryRetrieveLevel 'FOO'" in env.node.log()
    assert env.node.alive()
    scu.echo(peer)


@pytest.mark.timeout(60)
def test_find_honours_c_cancel(env: Env) -> None:
    # The C-CANCEL races the responses already in flight: on a loaded machine the node may have
    # sent all 3000 before it arrives, so one of three attempts must be cut short.
    counts = []
    for _ in range(3):
        rsp, log = findscu(env, "QueryRetrieveLevel=IMAGE", f"SeriesInstanceUID={env.bulk_series}", "SOPInstanceUID",
                           extra=("--cancel", "1"))
        assert "Cancel" in log, log[-2000:]
        counts.append(len(rsp))
        if len(rsp) < 3000:
            break
    assert 1 <= counts[-1] < 3000, counts
    assert "cancelled after" in env.node.log()
    # Without the cancel, all 3000 come back.
    rsp, _ = findscu(env, "QueryRetrieveLevel=IMAGE", f"SeriesInstanceUID={env.bulk_series}", "InstanceNumber")
    assert len(rsp) == 3000 and values(rsp, "InstanceNumber")[:3] == ["0", "1", "2"]


# --------------------------------------------------------------------------- C-GET


GETSCU_FILES = [(n, o) for n, o in REAL_FILES if o]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("name,option", GETSCU_FILES, ids=[n for n, _ in GETSCU_FILES])
def test_getscu_round_trip_is_byte_exact(env: Env, name: str, option: str) -> None:
    out = env.work / f"get-{name}"
    out.mkdir()
    uid = env.real_uids[name]
    res = run(["getscu", "-S", "-aec", env.node.ae_title, option, "+B", "-od", str(out), "127.0.0.1",
               str(env.node.port), "-k", "QueryRetrieveLevel=IMAGE", "-k", f"SOPInstanceUID={uid}"], check=False)
    got = list(out.iterdir())
    assert len(got) == 1, f"{res.stderr}\n{env.node.log()[-1500:]}"
    assert body(got[0]) == body(env.real[name])


@pytest.mark.timeout(30)
def test_acceptor_can_prefer_the_requestors_transfer_syntax() -> None:
    """node.dimse.compat.contexts.prefer_requestor_syntaxes, in a real negotiation (what getscu +xv proposes)."""
    from pynetdicom import AE, evt

    from node.dimse.compat.contexts import prefer_requestor_syntaxes

    j2k = "1.2.840.10008.1.2.4.90"
    acceptor = AE("ACCEPTOR")
    acceptor.add_supported_context(CT, [ExplicitVRLittleEndian, j2k], scu_role=True, scp_role=True)
    port = free_port()
    accepted = {}
    for prefer in (False, True):
        handlers = [(evt.EVT_REQUESTED, lambda e: prefer_requestor_syntaxes(e.assoc))] if prefer else []
        server = acceptor.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
        try:
            requestor = AE("REQUESTOR")
            requestor.add_requested_context(CT, [j2k, ExplicitVRLittleEndian])
            assoc = requestor.associate("127.0.0.1", port, ae_title="ACCEPTOR")
            accepted[prefer] = str(assoc.accepted_contexts[0].transfer_syntax[0])
            assoc.release()
        finally:
            server.shutdown()
    assert accepted == {False: ExplicitVRLittleEndian, True: j2k}


@pytest.mark.timeout(60)
def test_getscu_gets_a_converted_copy_when_it_cannot_take_the_stored_syntax(env: Env, tmp_path: Path) -> None:
    name = "MR_small_implicit.dcm"
    run(["getscu", "-S", "-aec", env.node.ae_title, "-od", str(tmp_path), "127.0.0.1", str(env.node.port),
         "-k", "QueryRetrieveLevel=IMAGE", "-k", f"SOPInstanceUID={env.real_uids[name]}"])
    (got,) = tmp_path.iterdir()
    assert body(got)[0] == ExplicitVRLittleEndian  # what getscu proposed; stored in Implicit VR
    assert pydicom.dcmread(got) == pydicom.dcmread(env.real[name])
    assert "sending in Explicit VR Little Endian (stored in Implicit VR Little Endian" in env.node.log()


@pytest.mark.timeout(60)
def test_get_by_series_and_study_and_model(env: Env, tmp_path: Path) -> None:
    from iods import model_object

    out = tmp_path / "series"
    out.mkdir()
    run(["getscu", "-S", "-aec", env.node.ae_title, "-od", str(out), "127.0.0.1", str(env.node.port),
         "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={env.uids['studyA']}",
         "-k", f"SeriesInstanceUID={env.uids['seriesA1']}"])
    assert sorted(pydicom.dcmread(p).SOPInstanceUID for p in out.iterdir()) == sorted(
        env.uids[f"sopA1_{i}"] for i in (1, 2, 3))
    out = tmp_path / "patient"
    out.mkdir()
    run(["getscu", "-P", "-aec", env.node.ae_title, "-od", str(out), "127.0.0.1", str(env.node.port),
         "-k", "QueryRetrieveLevel=PATIENT", "-k", "PatientID=PID001"])
    assert len(list(out.iterdir())) == 4
    # The model object: Raw Data Storage, Explicit VR Little Endian, the same ONNX bytes.
    out = tmp_path / "model"
    out.mkdir()
    run(["getscu", "-S", "-aec", env.node.ae_title, "-od", str(out), "127.0.0.1", str(env.node.port),
         "-k", "QueryRetrieveLevel=IMAGE", "-k", f"SOPInstanceUID={env.model_uid}"])
    (got,) = out.iterdir()
    assert body(got)[0] == ExplicitVRLittleEndian
    model_object.unpack_file(got, tmp_path / "back.onnx")
    assert (tmp_path / "back.onnx").read_bytes() == env.model_onnx


@pytest.mark.timeout(60)
def test_get_refuses_an_identifier_without_its_unique_key(env: Env) -> None:
    res = run(["getscu", "-S", "-aec", env.node.ae_title, "127.0.0.1", str(env.node.port),
               "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientName=Doe^John"], check=False)
    assert "DataSetDoesNotMatchSOPClass" in res.stderr
    assert "a STUDY retrieve needs StudyInstanceUID" in env.node.log()
    assert env.node.alive()


# --------------------------------------------------------------------------- C-MOVE


def _movescu(env: Env, dest: str, *keys: str, port: int | None = None, out: Path | None = None,
             root: str = "-S") -> subprocess.CompletedProcess:
    args = ["movescu", "-v", root, "-aec", env.node.ae_title, "-aem", dest]
    if port:
        # +B (bit-preserving) writes into the working directory whatever -od says (dcmtk 3.6.7).
        args += ["--port", str(port), "+xa", "+B", "-od", str(out)]
    args += ["127.0.0.1", str(env.node.port)]
    for k in keys:
        args += ["-k", k]
    return run(args, check=False, cwd=out or env.work)


@pytest.mark.timeout(90)
def test_movescu_receives_byte_exact_files(env: Env) -> None:
    out = env.work / "moved"
    out.mkdir()
    uids = [env.real_uids[n] for n, _ in REAL_FILES]
    res = _movescu(env, "MOVESCU", "QueryRetrieveLevel=IMAGE", "SOPInstanceUID=" + "\\".join(uids),
                   port=env.ports["MOVESCU"], out=out)
    assert res.returncode == 0, res.stderr
    received = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in out.iterdir()}
    assert set(received) == set(uids), res.stderr[-2000:]
    for name, _ in REAL_FILES:
        assert body(received[env.real_uids[name]]) == body(env.real[name]), name


@pytest.mark.timeout(60)
def test_move_to_storescp_at_study_level(env: Env, tmp_path: Path) -> None:
    out = tmp_path / "storescp"
    out.mkdir()
    proc = subprocess.Popen(["storescp", "-aet", "STORESCP", "-od", str(out), "+B", str(env.ports["STORESCP"])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(env.ports["STORESCP"], 10, proc)
        res = _movescu(env, "STORESCP", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={env.uids['studyA']}")
        assert res.returncode == 0, res.stderr
        assert "Received Final Move Response (Success)" in res.stderr
        received = sorted(str(pydicom.dcmread(p).SOPInstanceUID) for p in out.iterdir())
        assert received == sorted([*(env.uids[f"sopA1_{i}"] for i in (1, 2, 3)), env.uids["sopA2_1"]])
    finally:
        stop(proc)


@pytest.mark.timeout(60)
def test_move_to_unknown_destination_is_refused(env: Env) -> None:
    res = _movescu(env, "STRANGER", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={env.uids['studyA']}")
    assert "MoveDestinationUnknown" in res.stderr
    assert "move destination 'STRANGER' is not a configured peer" in env.node.log()
    assert env.node.alive()


class PickySCP:
    """A pynetdicom storage SCP for some SOP classes only, refusing (0xA700) the instances ``refuse`` picks."""

    def __init__(self, ae_title: str, port: int, classes: list[str], refuse) -> None:
        from pynetdicom import AE, evt

        self.refuse = refuse
        self.received: list[str] = []
        self.ae = AE(ae_title)
        for c in classes:
            self.ae.add_supported_context(c, [ExplicitVRLittleEndian])
        self.server = self.ae.start_server(("127.0.0.1", port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self.on_store)])

    def on_store(self, event) -> int:
        ds = event.dataset
        if self.refuse(ds):
            return 0xA700
        self.received.append(str(ds.SOPInstanceUID))
        return 0x0000

    def close(self) -> None:
        self.server.shutdown()


def _move(env: Env, dest: str, ident: Dataset):
    from node.scu import client as scu

    peer = scu.Address(env.node.ae_title, "127.0.0.1", env.node.port)
    try:
        return scu.fetch(peer, identifier=ident, move_to=dest, options=scu.Options(retry=scu.NO_RETRY)), None
    except scu.QueryFailed as exc:
        return None, exc


@pytest.mark.timeout(60)
def test_move_partial_and_total_failures_have_the_right_counts(env: Env) -> None:
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = env.uids["studyA"]  # 3 CT (instance 3 refused by status) + 1 MR (no context)
    picky = PickySCP("PICKY", env.ports["PICKY"], [CT], refuse=lambda ds: int(ds.InstanceNumber) == 3)
    try:
        result, err = _move(env, "PICKY", ident)
    finally:
        picky.close()
    assert err is None
    assert result.status == 0xB000
    assert (result.completed, result.failed, result.warning) == (2, 2, 0)
    assert sorted(result.failed_uids) == sorted([env.uids["sopA1_3"], env.uids["sopA2_1"]])
    assert sorted(picky.received) == sorted([env.uids["sopA1_1"], env.uids["sopA1_2"]])
    assert "C-MOVE for" in env.node.log() and "2 completed, 0 warning, 2 failed" in env.node.log()

    nothing = PickySCP("NOTHING", env.ports["NOTHING"], [CT, MR], refuse=lambda ds: True)  # refuses every one
    try:
        result, err = _move(env, "NOTHING", ident)
    finally:
        nothing.close()
    assert result is None and err.status == 0xA702
    assert "0 completed, 4 failed" in str(err)
    # A configured destination that does not answer: 0xA801.
    result, err = _move(env, "NOBODY", ident)
    assert result is None and err.status == 0xA801
    assert env.node.alive()


# --------------------------------------------------------------------------- the CLI


def cli(node: NodeProcess, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return node.cli(*args, timeout=timeout)


@pytest.mark.timeout(90)
def test_cli_echo_store_find_fetch(env: Env, tmp_path: Path) -> None:
    import json

    to = f"{env.node.ae_title}@127.0.0.1:{env.node.port}"
    res = cli(env.node, "echo", "--to", to)
    assert res.returncode == 0 and "C-ECHO success" in res.stdout, res.stderr
    # store: several files with a progress bar (stderr not a terminal: no bar), one not DICOM.
    study = generate_uid()
    files = [synthetic(tmp_path / f"s{i}.dcm", CT, PatientID="CLI", PatientName="Cli^Test", StudyInstanceUID=study,
                       SeriesInstanceUID=generate_uid(), Modality="CT", InstanceNumber=i) for i in range(3)]
    res = cli(env.node, "store", *map(str, files), str(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")), "--to", to)
    assert res.returncode == 0 and "stored 4 of 4" in res.stdout, res.stderr
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    res = cli(env.node, "store", str(junk), "--to", to)
    assert res.returncode == 3 and "not a DICOM file" in res.stderr
    # find: table and JSON.
    res = cli(env.node, "find", "--to", to, "--level", "SERIES", "-k", "Modality=CT", "-k", "BodyPartExamined=CHEST",
              "-k", "SeriesDescription")
    assert res.returncode == 0 and "test-lung-seg 1.0.0" in res.stdout and "SeriesDescription" in res.stdout
    res = cli(env.node, "find", "--to", to, "--level", "SERIES", "--json", "-k", "SeriesDescription",
              "-k", "AcquisitionContextSequence[0].ConceptCodeSequence[0].CodeValue=39607008")
    rows = json.loads(res.stdout)
    assert [r["SeriesDescription"] for r in rows] == ["test-lung-seg 1.0.0"]
    assert rows[0]["AcquisitionContextSequence"][0]["ConceptCodeSequence"][0]["CodeValue"] == "39607008"
    res = cli(env.node, "find", "--to", to, "--level", "STUDY", "-k", "PatientID=CLI")
    assert res.returncode == 0 and study in res.stdout  # default columns when only matching keys are given
    # fetch --get by a model's UID (level found by asking): byte-exact, unpacks to the same ONNX.
    out = tmp_path / "fetched"
    res = cli(env.node, "fetch", env.model_uid, "--to", to, "--get", "-o", str(out))
    assert res.returncode == 0, res.stderr
    (got,) = out.iterdir()
    res = cli(env.node, "models", "unpack", str(got), "-o", str(tmp_path / "m.onnx"))
    assert res.returncode == 0 and (tmp_path / "m.onnx").read_bytes() == env.model_onnx
    # fetch --get of compressed files by series: each in its own transfer syntax, byte for byte.
    for name in ("693_J2KR.dcm", "emri_small_jpeg_ls_lossless.dcm", "rtdose_rle.dcm"):
        series = str(pydicom.dcmread(env.real[name], stop_before_pixels=True).SeriesInstanceUID)
        out = tmp_path / f"series-{name}"
        res = cli(env.node, "fetch", series, "--to", to, "--get", "-o", str(out))
        assert res.returncode == 0, res.stderr
        got = [p for p in out.iterdir() if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
               == env.real_uids[name]]
        assert body(got[0]) == body(env.real[name])
    # fetch --move-to with our own receiver.
    out = tmp_path / "moved"
    res = cli(env.node, "fetch", env.uids["studyB"], "--to", to, "--move-to", "MOVESCU", "--listen",
              str(env.ports["MOVESCU"]), "--listen-address", "127.0.0.1", "-o", str(out))
    assert res.returncode == 0 and "2 completed" in res.stdout, res.stderr
    assert len(list(out.iterdir())) == 2
    # Unknown UID: not found (4); failure status: exit 6 at once, no retry.
    res = cli(env.node, "fetch", "1.2.3.4.5.6.7", "--to", to, "--get")
    assert res.returncode == 4
    res = cli(env.node, "fetch", env.uids["studyB"], "--to", to, "--move-to", "STRANGER", "--level", "STUDY")
    assert res.returncode == 6 and "0xA801" in res.stderr and "retrying" not in res.stderr


@pytest.mark.timeout(60)
def test_cli_retries_until_the_peer_comes_up(env: Env, tmp_path: Path) -> None:
    port = free_port()
    to = f"LATE@127.0.0.1:{port}"
    # Nothing listening and no retries: a peer failure, exit 6.
    res = cli(env.node, "echo", "--to", to, "--retries", "0")
    assert res.returncode == 6 and "retrying" not in res.stderr
    # The peer (a pynetdicom Verification SCP on 127.0.0.1) starts once the client has logged a
    # failed attempt against the closed port, so the client must retry to succeed however slowly
    # either side starts. start_server() returns listening; the next attempt is 0.3 s later and
    # five more follow over ~9 s, so the client's retries outlast the start.
    from pynetdicom import AE

    late = AE("LATE")
    late.add_supported_context("1.2.840.10008.1.1")
    server = None
    stdout_path = tmp_path / "echo.out"
    lines: list[str] = []
    with stdout_path.open("w") as stdout_file:
        # stdout to a file: only stderr is piped, and this loop drains it to EOF, so neither blocks.
        client = subprocess.Popen([*MODELNODE, "--config", str(env.node.config_path), "echo", "--to", to,
                                   "--retries", "6", "--retry-delay", "0.3"], stdout=stdout_file,
                                  stderr=subprocess.PIPE, text=True, cwd=REPO)
    assert client.stderr is not None
    try:
        for line in client.stderr:
            lines.append(line)
            if server is None and "retrying in" in line:
                server = late.start_server(("127.0.0.1", port), block=False)
        client.wait(timeout=10)  # stderr is at EOF: the client has exited or is about to
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(10)
        client.stderr.close()
        if server is not None:
            server.shutdown()
    stderr, stdout = "".join(lines), stdout_path.read_text()
    assert server is not None, f"the client never retried:\n{stderr}"
    assert client.returncode == 0, stderr
    assert "C-ECHO success" in stdout
    # A definite failure status is not retried: a PATIENT query on the Study Root model.
    to = f"{env.node.ae_title}@127.0.0.1:{env.node.port}"
    res = cli(env.node, "find", "--to", to, "--level", "PATIENT", "-k", "PatientName")
    assert res.returncode == 6 and "0xA900" in res.stderr and "retrying" not in res.stderr


@pytest.mark.timeout(10)
def test_address_parsing() -> None:
    from node.scu.client import Address

    assert Address.parse("ORTHANC@127.0.0.1:4242") == Address("ORTHANC", "127.0.0.1", 4242)
    assert Address.parse("PACS@[::1]:104") == Address("PACS", "::1", 104)
    assert str(Address.parse("PACS@[::1]:104")) == "PACS@[::1]:104"
    for bad in ("ORTHANC", "A@host", "@h:1", "A@h:99999", "A\\B@h:1", "TOOLONGAETITLE12345@h:1"):
        with pytest.raises(ValueError):
            Address.parse(bad)

