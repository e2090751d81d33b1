"""C-FIND: the query engine and the C-FIND SCP handler (Patient Root and Study Root).

The engine turns a request identifier into a :class:`Query` (level, information model, match
conditions, the keys to return), runs it against the instance index (:mod:`node.storage.index`, with the
model registry's coded terms for the anatomy and finding keys) and builds one response identifier
per match. :mod:`node.dimse.retrieve_scp` reuses it to resolve C-MOVE and C-GET identifiers to instances.

Matching (PS3.4 C.2.2.2), as implemented here:

* **Universal**: an empty value (or a lone ``*``) matches everything and asks for the value back.
* **Single value**: exact and case-sensitive, except PN, which matches case-insensitively (what
  users of every PACS expect; PS3.4 leaves PN case sensitivity to the SCP). Leading and trailing
  spaces are not significant. A backslash-separated list (``Modality=CT\\MR``) matches any of its
  values.
* **Wildcard**: ``*`` (any run) and ``?`` (one character) on text VRs (AE CS LO LT PN SH ST UC UR
  UT). Nothing else is special: ``%``, ``_`` and ``[`` match themselves.
* **UID list**: a backslash-separated list of UIDs matches any of them.
* **Range**: DA and TM accept ``a-b``, ``a-`` and ``-b``, inclusive; an empty stored
  value never matches a range. A single TM value matches the whole period it names (``10``
  matches 10:00:00 to 10:59:59.999999). Date and time ranges are matched separately, not as one
  combined date-time range.
* **Sequence**: ``AcquisitionContextSequence`` (the model object's coded anatomy, DCM 123014
  "Target Region", and findings, DCM 121071 "Finding", with the SNOMED CT code in
  ``ConceptCodeSequence``) and ``AnatomicRegionSequence`` (an alias for the anatomy) match on
  the single query item's CodeValue, CodingSchemeDesignator and CodeMeaning; an entity matches
  when one of its items matches, and the matching items are returned (all items when the query
  item is empty). They are indexed for model objects only; an image never matches a non-empty
  coded key.

Keys of the requested level and of every level above are matched (so the unique keys of the
parent levels narrow a hierarchical query, and e.g. a Study Root SERIES query may also say
``PatientName``). Keys of lower levels are not matched and come back empty. Keys the node does not
index come back empty. Responses carry the requested keys only, plus QueryRetrieveLevel,
SpecificCharacterSet (always ISO_IR 192: values come from a Unicode index) and RetrieveAETitle.

The SQL does the narrowing it can do portably (equality, IN, date ranges, a case-insensitive
LIKE that is a superset of the wildcard match); every condition is then checked exactly in
Python, so SQLite and PostgreSQL answer the same.
"""

from __future__ import annotations

import functools
import logging
import operator
import re
from collections import defaultdict, namedtuple
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import peewee
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag

from node.dimse.association import assoc_id
from node.dimse.compat import find_responses
from node.dimse.identifier import Field, IdentifierEncoder, NotEncodable
from node.dimse.levels import LEVELS, UNIQUE_KEYS
from node.dimse.status import (
    CANCEL,
    IDENTIFIER_DOES_NOT_MATCH,
    PENDING,
    SUCCESS,
    UNABLE_TO_PROCESS,
    UNABLE_TO_READ_INDEX,
)
from node.storage.db import database_proxy
from node.storage.index import Instance, Patient, Series, Study

log = logging.getLogger("modelnode.query")

PATIENT_ROOT = "PATIENT"
STUDY_ROOT = "STUDY"

# Find / Move / Get SOP classes of each information model.
PATIENT_ROOT_UIDS = {
    "1.2.840.10008.5.1.4.1.2.1.1",
    "1.2.840.10008.5.1.4.1.2.1.2",
    "1.2.840.10008.5.1.4.1.2.1.3",
}
STUDY_ROOT_UIDS = {
    "1.2.840.10008.5.1.4.1.2.2.1",
    "1.2.840.10008.5.1.4.1.2.2.2",
    "1.2.840.10008.5.1.4.1.2.2.3",
}


QUERY_RETRIEVE_LEVEL = Tag(0x0008, 0x0052)
SPECIFIC_CHARACTER_SET = Tag(0x0008, 0x0005)
RETRIEVE_AE_TITLE = Tag(0x0008, 0x0054)

_TEXT_VRS = {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"}
_RANGE_VRS = {"DA", "TM"}
# SQLite's default limit on bound variables is 32766 (999 before 3.32); stay well below both.
_CHUNK = 500

# Concept names of the model object's Acquisition Context items (iods.model_object).
TARGET_REGION = ("123014", "DCM", "Target Region")
FINDING = ("121071", "DCM", "Finding")
_KIND_OF_CONCEPT = {TARGET_REGION[0]: "anatomy", FINDING[0]: "finding"}
_CONCEPT_OF_KIND = {"anatomy": TARGET_REGION, "finding": FINDING}
CODED_KEYS = ("AcquisitionContextSequence", "AnatomicRegionSequence")


class QueryError(Exception):
    """The identifier cannot be answered: ``status`` and ``comment`` go back to the peer."""

    def __init__(self, status: int, comment: str, offending: Sequence[int] = ()) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment[:64]  # ErrorComment is LO
        self.offending = list(offending)

    def status_dataset(self) -> Dataset:
        ds = Dataset()
        ds.Status = self.status
        ds.ErrorComment = self.comment
        if self.offending:
            ds.OffendingElement = self.offending
        return ds


# --------------------------------------------------------------------------- rows


# The columns of each table a query reads, in the order they are selected. A result row is a
# tuple; each table's slice of it becomes one of these named tuples (no peewee model objects:
# building them cost more than the rest of a row's work).
_COLUMNS: dict[str, tuple[type[peewee.Model], tuple[str, ...]]] = {
    "patient": (Patient, ("id", "patient_id", "issuer", "patient_name", "birth_date", "sex")),
    "study": (Study, ("id", "study_uid", "study_date", "study_time", "accession_number", "study_id",
                      "study_description", "referring_physician", "requested_procedure")),
    "series": (Series, ("id", "series_uid", "modality", "series_number", "series_description", "series_date",
                        "series_time", "body_part", "protocol_name", "laterality", "manufacturer",
                        "software_versions", "is_model")),
    "instance": (Instance, ("id", "sop_uid", "sop_class_uid", "instance_number", "rows", "columns", "frames",
                            "samples_per_pixel", "photometric", "transfer_syntax")),
}
_ROW_TYPES = {table: namedtuple(f"{table.title()}Row", names) for table, (_, names) in _COLUMNS.items()}
# The tables a query of each level reads: the level's own and its parents.
_TABLES = {"PATIENT": ("patient",), "STUDY": ("patient", "study"), "SERIES": ("patient", "study", "series"),
           "IMAGE": ("patient", "study", "series", "instance")}
_TABLE_OF_LEVEL = {"PATIENT": "patient", "STUDY": "study", "SERIES": "series", "IMAGE": "instance"}


@dataclass(slots=True)
class Match:
    """One matching entity with its parents (those below the query level are None), as rows of
    their tables' columns (:data:`_COLUMNS`)."""

    patient: Any
    study: Any = None
    series: Any = None
    instance: Any = None
    computed: dict[str, Any] = field(default_factory=dict)


def _row_maker(level: str) -> Callable[[Sequence[Any]], Match]:
    """A function from a result row (the level's columns, :func:`select_sql`) to a Match."""
    slices = []
    start = 0
    for table in _TABLES[level]:
        width = len(_COLUMNS[table][1])
        slices.append((_ROW_TYPES[table]._make, start, start + width))
        start += width
    if len(slices) == 1:
        (make_p, a, b), = slices
        return lambda row: Match(make_p(row[a:b]))
    if len(slices) == 2:
        (make_p, a, b), (make_s, c, d) = slices
        return lambda row: Match(make_p(row[a:b]), make_s(row[c:d]))
    if len(slices) == 3:
        (make_p, a, b), (make_s, c, d), (make_e, e, f) = slices
        return lambda row: Match(make_p(row[a:b]), make_s(row[c:d]), make_e(row[e:f]))
    (make_p, a, b), (make_s, c, d), (make_e, e, f), (make_i, g, h) = slices
    return lambda row: Match(make_p(row[a:b]), make_s(row[c:d]), make_e(row[e:f]), make_i(row[g:h]))


def _fields(level: str) -> list[peewee.Field]:
    return [getattr(model, name) for table in _TABLES[level] for model, names in (_COLUMNS[table],)
            for name in names]


def _select(level: str) -> peewee.ModelSelect:
    """The level's table joined with its parents, so one row carries all of them."""
    fields = _fields(level)
    if level == "PATIENT":
        return Patient.select(*fields)
    if level == "STUDY":
        return Study.select(*fields).join(Patient)
    if level == "SERIES":
        return Series.select(*fields).join(Study).join(Patient)
    return Instance.select(*fields).join(Series).join(Study).join(Patient)


# SeriesNumber is kept as text (IS): a plain integer sorts by its value, anything else after
# every number, by its text. The same rule in Python (_series_number) and in SQL (_series_order).
_PLAIN_INTEGER = re.compile(r"[-+]?[0-9]+\Z")
_NOT_A_NUMBER = 1 << 31


def _series_number(value: str | None) -> tuple[int, str]:
    if value and _PLAIN_INTEGER.match(value):
        return (int(value), value)
    return (_NOT_A_NUMBER, value or "")


def _is_postgres(db: peewee.Database) -> bool:
    return isinstance(db, peewee.PostgresqlDatabase)


def _text_order(column: peewee.Field, db: peewee.Database) -> peewee.Node:
    # Python compares code points, as SQLite's BINARY collation does on UTF-8; PostgreSQL sorts
    # by the database's locale unless told otherwise.
    return column.collate('"C"') if _is_postgres(db) else column


def _series_order(db: peewee.Database) -> peewee.Node:
    col = Series.series_number
    if _is_postgres(db):
        plain = col.regexp("^[-+]?[0-9]+$")
        number = peewee.Cast(col, "BIGINT")
    else:
        plain = (peewee.NodeList((col, peewee.SQL("GLOB '[-+0-9]*'")))
                 & peewee.NodeList((peewee.fn.substr(col, 2), peewee.SQL("NOT GLOB '*[^0-9]*'")))
                 & col.not_in(["+", "-"]))
        number = peewee.Cast(col, "INTEGER")
    return peewee.Case(None, [(plain, number)], _NOT_A_NUMBER)


def _order_by(level: str, db: peewee.Database) -> list[peewee.Node]:
    """The deterministic order of the matches, done by the database: patient (ID, issuer),
    study (date, time, UID), series (number, UID), instance (number, missing last; UID)."""
    out = [_text_order(Patient.patient_id, db), _text_order(Patient.issuer, db), Patient.id]
    if level in ("STUDY", "SERIES", "IMAGE"):
        out += [_text_order(Study.study_date, db), _text_order(Study.study_time, db), _text_order(Study.study_uid, db)]
    if level in ("SERIES", "IMAGE"):
        out += [_series_order(db), _text_order(Series.series_number, db), _text_order(Series.series_uid, db)]
    if level == "IMAGE":
        out += [peewee.Case(None, [(Instance.instance_number.is_null(), 1)], 0), Instance.instance_number,
                _text_order(Instance.sop_uid, db)]
    return out


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class Key:
    """A query key the index can answer: its level, VR, column and how to read it from a match."""

    keyword: str
    level: str
    vr: str
    get: Callable[[Match], Any]
    column: peewee.Field | None = None  # None: computed or not SQL-matchable
    computed: str = ""  # name in Match.computed for keys counted after the query


def _attr(level: str, name: str) -> Callable[[Match], Any]:
    return operator.attrgetter(f"{_TABLE_OF_LEVEL[level]}.{name}")


def _k(keyword: str, level: str, vr: str, column: peewee.Field) -> Key:
    return Key(keyword, level, vr, _attr(level, column.name), column)


def _c(keyword: str, level: str, vr: str) -> Key:
    return Key(keyword, level, vr, lambda m, kw=keyword: m.computed.get(kw), None, keyword)


KEYS: dict[str, Key] = {
    k.keyword: k
    for k in (
        # PATIENT
        _k("PatientName", "PATIENT", "PN", Patient.patient_name),
        _k("PatientID", "PATIENT", "LO", Patient.patient_id),
        _k("IssuerOfPatientID", "PATIENT", "LO", Patient.issuer),
        _k("PatientBirthDate", "PATIENT", "DA", Patient.birth_date),
        _k("PatientSex", "PATIENT", "CS", Patient.sex),
        _c("NumberOfPatientRelatedStudies", "PATIENT", "IS"),
        _c("NumberOfPatientRelatedSeries", "PATIENT", "IS"),
        _c("NumberOfPatientRelatedInstances", "PATIENT", "IS"),
        # STUDY
        _k("StudyInstanceUID", "STUDY", "UI", Study.study_uid),
        _k("StudyDate", "STUDY", "DA", Study.study_date),
        _k("StudyTime", "STUDY", "TM", Study.study_time),
        _k("AccessionNumber", "STUDY", "SH", Study.accession_number),
        _k("StudyID", "STUDY", "SH", Study.study_id),
        _k("StudyDescription", "STUDY", "LO", Study.study_description),
        _k("ReferringPhysicianName", "STUDY", "PN", Study.referring_physician),
        _k("RequestedProcedureDescription", "STUDY", "LO", Study.requested_procedure),
        _c("ModalitiesInStudy", "STUDY", "CS"),
        _c("SOPClassesInStudy", "STUDY", "UI"),
        _c("NumberOfStudyRelatedSeries", "STUDY", "IS"),
        _c("NumberOfStudyRelatedInstances", "STUDY", "IS"),
        # SERIES
        _k("SeriesInstanceUID", "SERIES", "UI", Series.series_uid),
        _k("Modality", "SERIES", "CS", Series.modality),
        _k("SeriesNumber", "SERIES", "IS", Series.series_number),
        _k("SeriesDescription", "SERIES", "LO", Series.series_description),
        _k("SeriesDate", "SERIES", "DA", Series.series_date),
        _k("SeriesTime", "SERIES", "TM", Series.series_time),
        _k("BodyPartExamined", "SERIES", "CS", Series.body_part),
        _k("ProtocolName", "SERIES", "LO", Series.protocol_name),
        _k("Laterality", "SERIES", "CS", Series.laterality),
        _k("Manufacturer", "SERIES", "LO", Series.manufacturer),
        _k("SoftwareVersions", "SERIES", "LO", Series.software_versions),
        _c("NumberOfSeriesRelatedInstances", "SERIES", "IS"),
        # IMAGE
        _k("SOPInstanceUID", "IMAGE", "UI", Instance.sop_uid),
        _k("SOPClassUID", "IMAGE", "UI", Instance.sop_class_uid),
        _k("InstanceNumber", "IMAGE", "IS", Instance.instance_number),
        _k("Rows", "IMAGE", "US", Instance.rows),
        _k("Columns", "IMAGE", "US", Instance.columns),
        _k("NumberOfFrames", "IMAGE", "IS", Instance.frames),
        _k("SamplesPerPixel", "IMAGE", "US", Instance.samples_per_pixel),
        _k("PhotometricInterpretation", "IMAGE", "CS", Instance.photometric),
        _k("AvailableTransferSyntaxUID", "IMAGE", "UI", Instance.transfer_syntax),
    )
}
# Available at every level: everything the node stores is on line.
KEYS["InstanceAvailability"] = Key("InstanceAvailability", "PATIENT", "CS", lambda m: "ONLINE")


def _level_index(level: str) -> int:
    return LEVELS.index(level)


# --------------------------------------------------------------------------- value matching


def _wildcard_regex(pattern: str, fold: bool) -> re.Pattern[str]:
    parts = []
    for ch in pattern:
        parts.append(".*" if ch == "*" else "." if ch == "?" else re.escape(ch))
    return re.compile("".join(parts), re.DOTALL | (re.IGNORECASE if fold else 0))


def _like_superset(pattern: str, fold: bool) -> str:
    """A LIKE pattern that matches at least what the DICOM wildcard pattern matches.

    ``%``, ``_`` and backslash become ``_`` (any one character) so no escape syntax is needed on
    either database; non-ASCII characters too when folding case, because SQLite's LIKE folds
    ASCII only. Python then checks the exact match.
    """
    out = []
    for ch in pattern:
        if ch == "*":
            out.append("%")
        elif ch in "?%_\\" or (fold and ord(ch) > 127):
            out.append("_")
        else:
            out.append(ch)
    return "".join(out)


def _norm_time(value: str, upper: bool) -> str:
    """TM as HHMMSS.FFFFFF; the components left out run from the start (or to the end) of the period."""
    whole, _, frac = value.strip().replace(":", "").partition(".")
    fill = "9" if upper else "0"
    mm_ss = "59" if upper else "00"
    hh, mm, ss = whole[0:2].zfill(2), whole[2:4] or mm_ss, whole[4:6] or mm_ss
    return f"{hh}{mm}{ss}.{(frac + fill * 6)[:6]}"


def _norm_date(value: str, upper: bool) -> str:
    return value.strip().replace(".", "")  # "2020.01.01" is the ACR-NEMA spelling


def _normaliser(vr: str) -> Callable[[str, bool], str]:
    return _norm_time if vr == "TM" else _norm_date


class Condition:
    """One matching key: narrows the SQL where it can, then decides exactly in Python."""

    key: Key

    def sql(self) -> peewee.Expression | None:
        return None

    def test(self, match: Match) -> bool:
        raise NotImplementedError


def _stored_values(value: Any) -> list[str]:
    if value is None:
        return [""]
    text = str(value)
    return text.split("\\") if "\\" in text else [text]


@dataclass
class ValueCondition(Condition):
    """Single value, list of values (UIDs, or CS alternatives) and wildcard matching."""

    key: Key
    values: list[str]

    def __post_init__(self) -> None:
        self.fold = self.key.vr == "PN"
        self.wild = self.key.vr in _TEXT_VRS and any(("*" in v or "?" in v) for v in self.values)
        self.regexes = [_wildcard_regex(v, self.fold) for v in self.values] if self.wild else []
        self.numeric = self.key.vr in ("IS", "US", "UL", "SS", "SL")
        if self.numeric:
            try:
                self.ints = {int(v) for v in self.values}
            except ValueError:
                self.ints = set()  # not a number: nothing matches

    def sql(self) -> peewee.Expression | None:
        col = self.key.column
        if col is None:
            return None
        if self.numeric:
            if isinstance(col, peewee.IntegerField):
                return col.in_(sorted(self.ints)) if self.ints else peewee.SQL("0 = 1")
            return None  # numbers kept as text (SeriesNumber): "01" equals "1", decided in Python
        if self.wild or self.fold:
            exprs = [col ** _like_superset(v, self.fold) for v in self.values]
            out = exprs[0]
            for e in exprs[1:]:
                out = out | e
            return out
        return col == self.values[0] if len(self.values) == 1 else col.in_(self.values)

    def test(self, match: Match) -> bool:
        stored = _stored_values(self.key.get(match))
        if self.numeric:
            for s in stored:
                try:
                    if int(str(s).strip()) in self.ints:
                        return True
                except ValueError:
                    continue
            return False
        stored = [s.strip() for s in stored]
        if self.wild:
            return any(r.fullmatch(s) for r in self.regexes for s in stored)
        if self.fold:
            wanted = {v.casefold() for v in self.values}
            return any(s.casefold() in wanted for s in stored)
        wanted = set(self.values)
        return any(s in wanted for s in stored)


@dataclass
class RangeCondition(Condition):
    """DA / TM range matching (and single TM values, matched as the period they name)."""

    key: Key
    low: str
    high: str

    def __post_init__(self) -> None:
        norm = _normaliser(self.key.vr)
        self.low_n = norm(self.low, False) if self.low else ""
        self.high_n = norm(self.high, True) if self.high else ""

    def sql(self) -> peewee.Expression | None:
        col = self.key.column
        if col is None or self.key.vr != "DA":
            return None  # TM has several spellings (10, 1000, 10:00): compared after normalising
        expr = col != ""
        if self.low_n:
            expr &= col >= self.low_n
        if self.high_n:
            expr &= col <= self.high_n
        return expr

    def test(self, match: Match) -> bool:
        raw = self.key.get(match)
        if raw is None or str(raw).strip() == "":
            return False
        stored = _normaliser(self.key.vr)(str(raw), False)
        if self.low_n and stored < self.low_n:
            return False
        return not (self.high_n and stored > self.high_n)


@dataclass
class CodeTemplate:
    """The query item of a coded sequence key, split into what is matched and what is returned."""

    kinds: tuple[str, ...]  # anatomy / finding
    value: list[str] = field(default_factory=list)  # CodeValue alternatives (empty: any)
    scheme: list[str] = field(default_factory=list)
    meaning: str = ""  # CodeMeaning pattern (wildcards allowed)
    item: Dataset | None = None  # the query item (decides which attributes come back)

    @property
    def universal(self) -> bool:
        return not (self.value or self.scheme or self.meaning)

    def matches(self, term: Any) -> bool:
        if term.kind not in self.kinds:
            return False
        if self.value and term.value not in self.value:
            return False
        if self.scheme and term.scheme not in self.scheme:
            return False
        return not (self.meaning and not _wildcard_regex(self.meaning, True).fullmatch(term.meaning or ""))


@dataclass
class CodedCondition(Condition):
    """Sequence matching on the coded anatomy / findings of model objects."""

    key: Key
    template: CodeTemplate

    def sql(self) -> peewee.Expression | None:
        # Imported here: node.storage.registry pulls in onnx, which the CLI's SCU commands never need.
        from node.storage.registry import ModelRecord, ModelTerm

        sub = ModelRecord.select(ModelRecord.series_uid).join(ModelTerm).where(ModelTerm.kind.in_(self.template.kinds))
        if self.template.value:
            sub = sub.where(ModelTerm.value.in_(self.template.value))
        if self.template.scheme:
            sub = sub.where(ModelTerm.scheme.in_(self.template.scheme))
        return Series.series_uid.in_(sub)

    def test(self, match: Match) -> bool:
        terms = match.computed.get("_terms", [])
        return any(self.template.matches(t) for t in terms)


@dataclass
class ComputedCondition(Condition):
    """Matching on a value computed per study (ModalitiesInStudy, SOPClassesInStudy)."""

    key: Key
    inner: ValueCondition

    def sql(self) -> peewee.Expression | None:
        if self.key.keyword == "ModalitiesInStudy":
            if self.inner.wild:
                return None
            sub = Series.select(Series.study).where(Series.modality.in_(self.inner.values))
            return Study.id.in_(sub)
        return None

    def test(self, match: Match) -> bool:
        return self.inner.test(match)


# --------------------------------------------------------------------------- parsing


@dataclass
class Query:
    """A parsed C-FIND (or C-MOVE / C-GET) identifier."""

    model: str  # PATIENT_ROOT or STUDY_ROOT
    level: str
    identifier: Dataset
    conditions: list[Condition] = field(default_factory=list)
    requested: list[DataElement] = field(default_factory=list)  # top-level elements to return
    coded: dict[str, CodeTemplate] = field(default_factory=dict)  # keyword -> template (returned)

    def value_of(self, keyword: str) -> str:
        if keyword not in self.identifier:
            return ""
        value = self.identifier.data_element(keyword).value
        return "" if value is None else str(value).strip()

    @property
    def computed_needed(self) -> set[str]:
        names = {KEYS[el.keyword].computed for el in self.requested if el.keyword in KEYS and KEYS[el.keyword].computed}
        names |= {c.key.computed for c in self.conditions if c.key.computed}
        return names


def information_model(sop_class_uid: str) -> str:
    """PATIENT_ROOT or STUDY_ROOT for a Find / Move / Get SOP class UID."""
    if sop_class_uid in PATIENT_ROOT_UIDS:
        return PATIENT_ROOT
    if sop_class_uid in STUDY_ROOT_UIDS:
        return STUDY_ROOT
    raise QueryError(IDENTIFIER_DOES_NOT_MATCH, f"unsupported information model {sop_class_uid}")


def _element_values(elem: DataElement) -> list[str]:
    """The query values of an element: [] for universal matching."""
    value = elem.value
    if value is None or value == "":
        return []
    if elem.VM > 1 or isinstance(value, (list, tuple)):
        values = [str(v).strip() for v in value]
    else:
        text = str(value).strip()
        values = [v.strip() for v in text.split("\\")] if "\\" in text else [text]
    values = [v for v in values if v != ""]
    if values == ["*"]:
        return []  # a lone '*' is universal matching whatever the VR
    return values


def _parse_code_template(keyword: str, elem: DataElement) -> CodeTemplate:
    kinds = ("anatomy", "finding") if keyword == "AcquisitionContextSequence" else ("anatomy",)
    seq = elem.value or []
    if len(seq) > 1:
        raise QueryError(IDENTIFIER_DOES_NOT_MATCH, f"{keyword} query must have at most one item", [elem.tag])
    if not seq:
        return CodeTemplate(kinds)
    item = seq[0]
    code_item = item
    if keyword == "AcquisitionContextSequence":
        name_seq = item.get("ConceptNameCodeSequence")
        if name_seq:
            name_values = _element_values(name_seq[0]["CodeValue"]) if "CodeValue" in name_seq[0] else []
            if name_values:
                kinds = tuple(_KIND_OF_CONCEPT[v] for v in name_values if v in _KIND_OF_CONCEPT) or ("none",)
        code_seq = item.get("ConceptCodeSequence")
        code_item = code_seq[0] if code_seq else Dataset()
    tpl = CodeTemplate(kinds, item=item)
    if "CodeValue" in code_item:
        tpl.value = _element_values(code_item["CodeValue"])
    if "CodingSchemeDesignator" in code_item:
        tpl.scheme = _element_values(code_item["CodingSchemeDesignator"])
    if "CodeMeaning" in code_item:
        meaning = _element_values(code_item["CodeMeaning"])
        tpl.meaning = meaning[0] if meaning else ""
    return tpl


def _condition(key: Key, elem: DataElement) -> Condition | None:
    values = _element_values(elem)
    if not values:
        return None
    if key.computed and key.keyword not in ("ModalitiesInStudy", "SOPClassesInStudy"):
        return None  # counts are returned, not matched
    if key.vr in _RANGE_VRS:
        if len(values) != 1:
            raise QueryError(IDENTIFIER_DOES_NOT_MATCH, f"{key.keyword}: one value or range expected", [elem.tag])
        value = values[0]
        if "-" in value:
            low, high = _split_range(value)
            return RangeCondition(key, low, high) if (low or high) else None
        if key.vr == "TM":
            return RangeCondition(key, value, value)
        return ValueCondition(key, [_norm_date(value, False)])
    inner = ValueCondition(key, values)
    if key.computed:
        return ComputedCondition(key, inner)
    return inner


def _split_range(value: str) -> tuple[str, str]:
    low, _, high = value.partition("-")
    return low.strip(), high.strip()


def _reading(keyword: str, tag: int, parse: Callable[[], Any]) -> Any:
    """``parse()``, with any error but a QueryError turned into 0xA900 naming the key."""
    try:
        return parse()
    except QueryError:
        raise
    except Exception as exc:  # noqa: BLE001 (pydicom value conversions raise many types)
        raise QueryError(IDENTIFIER_DOES_NOT_MATCH, f"{keyword} cannot be read: {exc}", [tag]) from exc


def parse_identifier(identifier: Dataset, model: str, *, retrieve: bool = False) -> Query:
    """Parse a request identifier; raises :class:`QueryError` with the status to send back."""
    try:
        level_elem = identifier.get(QUERY_RETRIEVE_LEVEL)
        level = "" if level_elem is None or level_elem.value is None else str(level_elem.value).strip().upper()
        elements = [e for e in identifier]
    except Exception as exc:  # pydicom decoding errors come in many types
        # The message can quote the identifier's values (PHI): DEBUG only, the kind of error above it.
        log.debug("identifier decode error: %s", exc)
        raise QueryError(UNABLE_TO_PROCESS,
                         f"identifier cannot be decoded ({type(exc).__name__}; details at debug level)") from exc
    if level_elem is None:
        raise QueryError(IDENTIFIER_DOES_NOT_MATCH, "QueryRetrieveLevel (0008,0052) is missing", [QUERY_RETRIEVE_LEVEL])
    if level not in LEVELS:
        raise QueryError(IDENTIFIER_DOES_NOT_MATCH, f"unsupported QueryRetrieveLevel {level!r}", [QUERY_RETRIEVE_LEVEL])
    if model == STUDY_ROOT and level == "PATIENT":
        raise QueryError(
            IDENTIFIER_DOES_NOT_MATCH, "PATIENT level is not part of the Study Root model", [QUERY_RETRIEVE_LEVEL]
        )
    query = Query(model, level, identifier)
    depth = _level_index(level)
    for elem in elements:
        tag = elem.tag
        if tag in (QUERY_RETRIEVE_LEVEL, SPECIFIC_CHARACTER_SET, RETRIEVE_AE_TITLE):
            continue
        if tag.is_private or tag.element == 0 or tag.group in (0x0000, 0x0002):
            continue  # private keys and group lengths are neither matched nor returned
        keyword = elem.keyword or keyword_for_tag(tag)
        query.requested.append(elem)
        if keyword in CODED_KEYS:
            if depth < _level_index("SERIES"):
                continue  # series/instance attributes: not matched at patient or study level
            tpl = _reading(keyword, tag, lambda kw=keyword, el=elem: _parse_code_template(kw, el))
            query.coded[keyword] = tpl
            if not tpl.universal:
                query.conditions.append(CodedCondition(Key(keyword, "SERIES", "SQ", lambda m: None), tpl))
            continue
        key = KEYS.get(keyword)
        if key is None or _level_index(key.level) > depth:
            if elem.VR != "SQ" and _element_values(elem):
                log.debug("key %s is not matched at %s level; returned empty", keyword or tag, level)
            continue
        cond = _reading(keyword, tag, lambda k=key, el=elem: _condition(k, el))
        if cond is not None:
            query.conditions.append(cond)
    if retrieve:
        unique = UNIQUE_KEYS[level]
        if not query.value_of(unique) or query.value_of(unique) == "*":
            raise QueryError(
                IDENTIFIER_DOES_NOT_MATCH, f"a {level} retrieve needs {unique}", [tag_for_keyword(unique) or 0]
            )
    return query


# --------------------------------------------------------------------------- running


def _chunks(ids: Sequence[int]) -> Iterator[Sequence[int]]:
    for i in range(0, len(ids), _CHUNK):
        yield ids[i : i + _CHUNK]


def sort_key(level: str) -> Callable[[Match], tuple]:
    """The order of :func:`matches` as a Python sort key (the database sorts; tests compare)."""

    def key(m: Match) -> tuple:
        parts: list[Any] = [m.patient.patient_id, m.patient.issuer, m.patient.id]
        if m.study is not None:
            parts += [m.study.study_date, m.study.study_time, m.study.study_uid]
        if m.series is not None:
            parts += [_series_number(m.series.series_number), m.series.series_uid]
        if m.instance is not None:
            n = m.instance.instance_number
            parts += [n if n is not None else _NOT_A_NUMBER, m.instance.sop_uid]
        return tuple(parts)

    return key


def _group_count(query: peewee.ModelSelect, group: peewee.Field, ids: Sequence[int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for chunk in _chunks(ids):
        for gid, n in query.where(group.in_(list(chunk))).group_by(group).tuples():
            out[gid] = n
    return out


def _group_distinct(query: peewee.ModelSelect, group: peewee.Field, ids: Sequence[int]) -> dict[int, list[str]]:
    out: dict[int, set[str]] = defaultdict(set)
    for chunk in _chunks(ids):
        for gid, value in query.where(group.in_(list(chunk))).distinct().tuples():
            if value:
                out[gid].add(value)
    return {k: sorted(v) for k, v in out.items()}


def compute(found: list[Match], level: str, names: set[str], coded: bool) -> None:
    """Fill Match.computed with the counts, lists and coded terms the query needs."""
    count = peewee.fn.COUNT
    if level == "PATIENT" and names:
        ids = sorted({m.patient.id for m in found})
        values: dict[str, dict[int, int]] = {}
        if "NumberOfPatientRelatedStudies" in names:
            values["NumberOfPatientRelatedStudies"] = _group_count(
                Study.select(Study.patient, count(Study.id)), Study.patient, ids)
        if "NumberOfPatientRelatedSeries" in names:
            values["NumberOfPatientRelatedSeries"] = _group_count(
                Series.select(Study.patient, count(Series.id)).join(Study), Study.patient, ids)
        if "NumberOfPatientRelatedInstances" in names:
            values["NumberOfPatientRelatedInstances"] = _group_count(
                Instance.select(Study.patient, count(Instance.id)).join(Series).join(Study), Study.patient, ids)
        for m in found:
            for name, per in values.items():
                m.computed[name] = per.get(m.patient.id, 0)
    if level == "STUDY" and names:
        ids = sorted({m.study.id for m in found if m.study is not None})
        counts: dict[str, dict[int, int]] = {}
        lists: dict[str, dict[int, list[str]]] = {}
        if "NumberOfStudyRelatedSeries" in names:
            counts["NumberOfStudyRelatedSeries"] = _group_count(
                Series.select(Series.study, count(Series.id)), Series.study, ids)
        if "NumberOfStudyRelatedInstances" in names:
            counts["NumberOfStudyRelatedInstances"] = _group_count(
                Instance.select(Series.study, count(Instance.id)).join(Series), Series.study, ids)
        if "ModalitiesInStudy" in names:
            lists["ModalitiesInStudy"] = _group_distinct(Series.select(Series.study, Series.modality), Series.study, ids)
        if "SOPClassesInStudy" in names:
            lists["SOPClassesInStudy"] = _group_distinct(
                Instance.select(Series.study, Instance.sop_class_uid).join(Series), Series.study, ids)
        for m in found:
            for name, per in counts.items():
                m.computed[name] = per.get(m.study.id, 0)
            for name, per_list in lists.items():
                m.computed[name] = "\\".join(per_list.get(m.study.id, []))
    if level in ("SERIES", "IMAGE") and "NumberOfSeriesRelatedInstances" in names:
        ids = sorted({m.series.id for m in found})
        per = _group_count(Instance.select(Instance.series, count(Instance.id)), Instance.series, ids)
        for m in found:
            m.computed["NumberOfSeriesRelatedInstances"] = per.get(m.series.id, 0)
    if coded and level in ("SERIES", "IMAGE"):
        from node.storage.registry import ModelRecord, ModelTerm

        uids = sorted({m.series.series_uid for m in found if m.series.is_model})
        terms: dict[str, list[Any]] = defaultdict(list)
        for i in range(0, len(uids), _CHUNK):
            rows = (ModelTerm.select(ModelTerm, ModelRecord.series_uid).join(ModelRecord)
                    .where(ModelRecord.series_uid.in_(uids[i : i + _CHUNK]))
                    .order_by(ModelTerm.id))
            for t in rows:
                terms[t.model.series_uid].append(t)
        for m in found:
            m.computed["_terms"] = terms.get(m.series.series_uid, [])


# Compiled queries by (database, level, the WHERE clause's text): peewee composed the whole
# query in about 1 ms, most of a small C-FIND's time in the node; the WHERE clause alone in 0.05 ms.
_compiled_sql: dict[tuple[int, str, str], tuple[str, list[Any]]] = {}
_COMPILED_MAX = 512


def _compiled(query: Query, db: peewee.Database) -> tuple[str, list[Any]]:
    """The SQL text and parameters of :func:`matches`' query for ``query``.

    The text depends on the query's shape only (its level and the structure of its WHERE
    clause, which the WHERE clause's own text names), so it is composed once per shape; the
    parameters are those of the WHERE clause, composed each time, then the ORDER BY's constants.
    A shape whose parameters do not come out in that order is never cached.
    """
    exprs = [e for e in (cond.sql() for cond in query.conditions) if e is not None]
    where = functools.reduce(operator.and_, exprs) if exprs else None
    if where is not None:
        ctx = db.get_sql_context()
        ctx.sql(where)
        where_text, where_params = ctx.query()
    else:
        where_text, where_params = "", []
    key = (id(db), query.level, where_text)
    cached = _compiled_sql.get(key)
    if cached is not None:
        text, tail = cached
        return text, [*where_params, *tail]
    sql = _select(query.level)
    if where is not None:
        sql = sql.where(where)
    text, params = sql.order_by(*_order_by(query.level, db)).sql()
    if params[:len(where_params)] == where_params:
        if len(_compiled_sql) >= _COMPILED_MAX:
            _compiled_sql.clear()
        _compiled_sql[key] = (text, params[len(where_params):])
    return text, params


def fetch_chunks(cursor: Any, size: int) -> Iterator[list[tuple]]:
    """The rows of a database cursor, ``size`` at a time (the one place rows are read)."""
    while rows := cursor.fetchmany(size):
        yield rows


def matches(query: Query, *, chunk: int = _CHUNK) -> Iterator[Match]:
    """Every match of ``query``, in a deterministic order (:func:`sort_key`), as they are read.

    A generator over the database cursor: rows are read ``chunk`` at a time, the values computed
    per entity (counts, coded terms) are read for that chunk, each row is checked exactly
    (:meth:`Condition.test`) and yielded. So the first match goes out before the last row is
    read, and at most one chunk is held, whatever the number of matches. One read transaction
    (one snapshot) lasts until the generator ends or is closed.

    With SQLite the cursor reads the rows as they are asked for. (psycopg2's default cursor
    fetches the whole result when the query runs: with PostgreSQL the driver holds the matching
    rows' tuples, while the responses are still built and sent one at a time.)
    """
    db = database_proxy.obj
    text, params = _compiled(query, db)
    make = _row_maker(query.level)
    computed = query.computed_needed
    coded = bool(query.coded)
    conditions = query.conditions
    with db.atomic():  # one read snapshot for the rows and everything computed from them
        cursor = db.execute_sql(text, params)
        try:
            for rows in fetch_chunks(cursor, chunk):
                found = [make(row) for row in rows]
                if computed or coded:
                    compute(found, query.level, computed, coded)
                for m in found:
                    if all(c.test(m) for c in conditions):
                        yield m
        finally:
            cursor.close()


def run(query: Query) -> list[Match]:
    """Every match of ``query`` (see :func:`matches`), as a list."""
    return list(matches(query))


def series_matches(series_uids: Sequence[str]) -> dict[str, Match]:
    """SERIES-level matches for these series (no conditions, nothing computed), by UID."""
    out: dict[str, Match] = {}
    make = _row_maker("SERIES")
    db = database_proxy.obj
    for i in range(0, len(series_uids), _CHUNK):
        sql = _select("SERIES").where(Series.series_uid.in_(list(series_uids[i:i + _CHUNK])))
        for row in db.execute_sql(*sql.sql()).fetchall():
            m = make(row)
            out[m.series.series_uid] = m
    return out


def instances_for(query: Query) -> list[Instance]:
    """The instances a C-MOVE / C-GET identifier names, with their series (is_model) loaded."""
    found = run(query)
    field_, ids = {
        "PATIENT": (Study.patient, [m.patient.id for m in found]),
        "STUDY": (Series.study, [m.study.id for m in found if m.study]),
        "SERIES": (Instance.series, [m.series.id for m in found if m.series]),
        "IMAGE": (Instance.id, [m.instance.id for m in found if m.instance]),
    }[query.level]
    out: list[Instance] = []
    for chunk in _chunks(sorted(set(ids))):
        sel = Instance.select(Instance, Series, Study).join(Series).join(Study).where(field_.in_(list(chunk)))
        out.extend(sel)
    if query.level == "IMAGE":  # in the order of the matches
        position = {instance_id: n for n, instance_id in enumerate(ids)}
        out.sort(key=lambda i: position[i.id])
        return out
    out.sort(key=lambda i: (i.series.study.study_uid, _series_number(i.series.series_number), i.series.series_uid,
                            i.instance_number if i.instance_number is not None else _NOT_A_NUMBER, i.sop_uid))
    return out


# --------------------------------------------------------------------------- responses


def _code_dataset(value: str, scheme: str, meaning: str, template: Dataset | None) -> Dataset:
    item = Dataset()
    full = template is None or len(template) == 0
    if full or "CodeValue" in template:
        item.CodeValue = value
    if full or "CodingSchemeDesignator" in template:
        item.CodingSchemeDesignator = scheme
    if full or "CodeMeaning" in template:
        item.CodeMeaning = meaning[:64]
    return item


def _coded_items(keyword: str, tpl: CodeTemplate, terms: Iterable[Any]) -> list[Dataset]:
    items = []
    for t in terms:
        if not tpl.matches(t):
            continue
        q = tpl.item
        if keyword == "AnatomicRegionSequence":
            items.append(_code_dataset(t.value, t.scheme, t.meaning, q))
            continue
        full = q is None or len(q) == 0
        item = Dataset()
        if full or "ValueType" in q:
            item.ValueType = "CODE"
        if full or "ConceptNameCodeSequence" in q:
            name = _CONCEPT_OF_KIND[t.kind]
            sub = q.ConceptNameCodeSequence[0] if not full and q.ConceptNameCodeSequence else None
            item.ConceptNameCodeSequence = DicomSequence([_code_dataset(name[0], name[1], name[2], sub)])
        if full or "ConceptCodeSequence" in q:
            sub = q.ConceptCodeSequence[0] if not full and q.ConceptCodeSequence else None
            item.ConceptCodeSequence = DicomSequence([_code_dataset(t.value, t.scheme, t.meaning, sub)])
        items.append(item)
    return items


def _format(vr: str, value: Any) -> Any:
    if value is None:
        return None
    if vr in ("US", "UL", "SS", "SL"):
        return int(value) if value != "" else None
    if vr == "IS":
        text = str(value).strip()
        return text if text else None
    text = str(value)
    return text if text != "" else None


def response(match: Match, query: Query, ae_title: str) -> Dataset:
    """The response identifier for one match: the requested keys, with values where indexed."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.QueryRetrieveLevel = query.level
    ds.RetrieveAETitle = ae_title
    depth = _level_index(query.level)
    for elem in query.requested:
        keyword = elem.keyword or keyword_for_tag(elem.tag)
        vr = _return_vr(elem)
        if keyword in CODED_KEYS:
            tpl = query.coded.get(keyword)
            items = _coded_items(keyword, tpl, match.computed.get("_terms", [])) if tpl is not None else []
            ds.add(DataElement(elem.tag, "SQ", DicomSequence(items)))
            continue
        key = KEYS.get(keyword)
        if key is None or _level_index(key.level) > depth:
            ds.add(DataElement(elem.tag, vr, DicomSequence([]) if vr == "SQ" else None))
            continue
        ds.add(DataElement(elem.tag, key.vr, _format(key.vr, key.get(match))))
    return ds


def _dictionary_vr(tag: int) -> str:
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "UN"
    return vr if len(vr) == 2 else "UN"  # ambiguous VRs (US or SS) come back as UN when empty


IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"


def _return_vr(elem: DataElement) -> str:
    """The VR an element the index does not answer comes back with (empty)."""
    return elem.VR if elem.VR not in ("UN", None) and len(elem.VR) == 2 else _dictionary_vr(elem.tag)


def response_encoder(query: Query, ae_title: str, transfer_syntax: str,
                     overrides: dict[str, Callable[[Match], Any]] | None = None) -> IdentifierEncoder | None:
    """An encoder of :func:`response`'s identifiers as bytes, or None where only pydicom will do.

    The same elements, values and VRs as :func:`response` (``tests/test_find_dimse.py`` compares
    the two), for Implicit and Explicit VR Little Endian. Coded sequence keys are left to
    :func:`response`. ``overrides`` give the value of a requested keyword from a match instead
    (the selection's rank and reasons).
    """
    if query.coded or transfer_syntax not in (IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN):
        return None
    overrides = overrides or {}
    fields: list[Field] = [
        (int(SPECIFIC_CHARACTER_SET), "CS", None, "ISO_IR 192"),
        (int(QUERY_RETRIEVE_LEVEL), "CS", None, query.level),
        (int(RETRIEVE_AE_TITLE), "AE", None, ae_title),
    ]
    depth = _level_index(query.level)
    for elem in query.requested:
        keyword = elem.keyword or keyword_for_tag(elem.tag)
        key = KEYS.get(keyword)
        answered = key is not None and _level_index(key.level) <= depth
        vr = key.vr if answered else _return_vr(elem)  # type: ignore[union-attr]
        if keyword in overrides:
            fields.append((int(elem.tag), vr, overrides[keyword], None))
        elif answered:
            fields.append((int(elem.tag), vr, lambda m, k=key: _format(k.vr, k.get(m)), None))
        else:
            fields.append((int(elem.tag), vr, None, None))
    try:
        return IdentifierEncoder(fields, implicit_vr=transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN)
    except NotEncodable:
        return None


def _peer(event: Any) -> str:
    assoc = event.assoc
    ident = assoc_id(assoc)
    rq = assoc.requestor
    return f"[{ident}] {(rq.ae_title or '?').strip()}@{rq.address}" if ident else f"{(rq.ae_title or '?').strip()}@{rq.address}"


# --------------------------------------------------------------------------- the C-FIND SCP


def handle_query(event: Any, ctx: Any) -> Iterator[tuple[int | Dataset, Dataset | None]]:
    """A C-FIND on the index: one pending response per match as it is read, then success (or
    cancel / failure).

    The matches stream from the database (:func:`matches`); each response identifier is encoded
    by :func:`response_encoder` where it can be (else built with pydicom, :func:`response`) and
    handed to pynetdicom as :class:`node.dimse.compat.find_responses.EncodedIdentifier`.
    Bound through :func:`node.dimse.find_scp.handle_find`, which sends selection queries elsewhere.
    """
    peer = _peer(event)
    try:
        model = information_model(str(event.request.AffectedSOPClassUID))
        query = parse_identifier(event.identifier, model)
    except QueryError as exc:
        log.warning("C-FIND from %s refused (0x%04X): %s", peer, exc.status, exc.comment)
        yield exc.status_dataset(), None
        return
    except Exception as exc:
        log.warning("C-FIND from %s refused: identifier cannot be decoded (%s)", peer, type(exc).__name__)
        log.debug("identifier decode error: %s", exc)
        yield QueryError(UNABLE_TO_PROCESS,
                         f"identifier cannot be decoded ({type(exc).__name__})").status_dataset(), None
        return
    ae_title = ctx.config.node.ae_title
    yield from stream_responses(event, query, matches(query), ae_title, "C-FIND", peer)


def stream_responses(event: Any, query: Query, found: Iterable[Match], ae_title: str, what: str, peer: str,
                     overrides: dict[str, Callable[[Match], Any]] | None = None,
                     ) -> Iterator[tuple[int | Dataset, Dataset | None]]:
    """Pending responses for ``found`` as they come, then success; cancel or failure on the way.

    Before each response: the hold-back of queued responses
    (:func:`node.dimse.compat.find_responses.hold_back`) and the check for a C-CANCEL.
    """
    assoc = event.assoc
    encoder = None
    if find_responses.accepts_encoded():
        encoder = response_encoder(query, ae_title, str(event.context.transfer_syntax), overrides)
    implicit = encoder is not None and encoder.implicit_vr
    n = 0
    try:
        for match in found:
            find_responses.hold_back(assoc)
            if event.is_cancelled:
                log.info("%s from %s cancelled after %d match(es)", what, peer, n)
                yield CANCEL, None
                return
            encoded = encoder.encode(match) if encoder is not None else None
            if encoded is not None:
                yield PENDING, find_responses.EncodedIdentifier(encoded, implicit)
            else:
                ds = response(match, query, ae_title)
                for keyword, get in (overrides or {}).items():
                    if keyword in ds:
                        ds[keyword].value = get(match)
                yield PENDING, ds
            n += 1
    except peewee.PeeweeException as exc:
        log.error("%s from %s failed after %d match(es): index error: %s", what, peer, n, exc)
        yield QueryError(UNABLE_TO_READ_INDEX, "the node's index cannot be read").status_dataset(), None
        return
    log.info("%s %s root %s level from %s: %d match(es)", what, query.model.lower(), query.level, peer, n)
    yield SUCCESS, None
