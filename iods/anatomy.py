"""Anatomy normalisation: DICOM header text and codes -> SNOMED CT regions with a confidence.

One place turns whatever a scanner wrote about *where* it imaged into SNOMED CT concept ids
that the model selection (``node/selection.py``) can compare with the anatomy a model targets.

Sources, in the order of trust (the weight is multiplied by the quality of the text match):

=====================================================  ======  ===============================
attribute                                              weight  why
=====================================================  ======  ===============================
AnatomicRegionSequence (also per-frame FrameAnatomy)   1.0     coded by the modality
BodyPartExamined                                       0.9     Annex L term, often a default
ProtocolName, SeriesDescription                        0.75    free text chosen per series
PerformedProcedureStepDescription,                     0.6     free text for the whole study
RequestedProcedureDescription, StudyDescription
=====================================================  ======  ===============================

Text quality: an exact word or phrase 1.0, a known abbreviation 0.9, a word found by splitting
``CamelCase`` 0.95x, a vertebra level (``L4``) 0.7, a truncated word 0.65, a one-letter typo or
a region spelt inside a longer token (``CTTHORAXABDOMEN``) 0.6; catch-all regions such as
EXTREMITY count 0.8x, so that "Knie re" in a description beats the radiography default
BodyPartExamined EXTREMITY. Within one text each further region loses 0.01 (the first named is
usually the examined one), and across attributes a region gains 0.03 per further attribute
naming it (at most 0.06: agreement breaks ties within a tier, never across tiers). Several
parts named together become their compound ("THORAX/ABDOMEN" -> 416550000) and a part named
beside its compound is absorbed by it ("Thorax^ThxAbd" -> chest-abdomen).

Tokenising: case, accents (``TÓRAX``), umlaut spellings (``SCHÄDEL``/``SCHAEDEL``) and vendor
separators (``^ _ - / , . + ( )``) do not matter; stop words (and, und, et, y, de...) are
dropped; noise words (modalities, views, kernels, contrast, phases) are never regions;
laterality words set ``AnatomyMatch.laterality`` for paired regions, and the short ones
(L, R, G, D, LI, RE, DX, SX) only right beside a region word (DX only after it: before it, it is
the modality). A BodyPartExamined value that is an Annex L term means what the standard says
(``FACE`` the face, although in a French description it is the frontal view).

The vocabulary is table-driven:

* the 317 PS3.16 Annex L ``BodyPartExamined`` terms are read from highdicom's copy of the
  standard, and the CID 4031 "Common Anatomic Regions" from pydicom's code dictionary, at load
  time (so a new release of either brings its new terms);
* ``iods/data/anatomy.toml`` adds what those lack: synonyms and abbreviations in English,
  German, French, Italian and Spanish, vendor strings, containment (lung lies in chest),
  compound regions (chest-abdomen-pelvis) and legacy codes (SNOMED-RT era ``51185008`` Thorax);
* a site adds its own words in the node configuration (below).

Site synonyms
-------------
A site whose scanners write something the table does not know adds it to the node's
configuration (``config/modelnode.toml``), without touching code::

    [anatomy.synonyms]
    "THX" = "CHEST"             # an Annex L term, a key of anatomy.toml ...
    "LUNGE LI" = "39607008"     # ... or a SNOMED CT concept id
    "PROTOKOLL 7" = "KNEE"

The node's loader passes that mapping to ``AnatomyNormaliser(extra_synonyms=...)``. Keys are
matched like any other phrase (case, accents and separators do not matter: ``lunge_li`` matches
``LUNGE LI``), and they win over the built-in table. A laterality word inside a site phrase
(``LUNGE LI``) still sets the laterality.

Containment and similarity
--------------------------
``relation(a, b)`` says whether ``a`` contains ``b`` (transitively), is contained in it, overlaps
it (both are parts of one compound region such as chest-abdomen-pelvis, neither containing the
other) or has nothing to do with it. Every region lies in "Entire body" (38266002), which is
ignored for overlaps. ``similarity`` turns that into a number: 1.0 exact, 0.75 for direct
containment, 0.1 less per further level (floor 0.5), 0.4 for overlaps and 0.0 otherwise.

Decisions worth knowing:

* The breast is *not* contained in the chest: a mammography model must not be offered for a
  chest CT, nor a lung model for a breast MRI. The two are declared to overlap (0.4).
* Spine segments lie in the spine only, not in neck/chest/abdomen: a lumbar spine MRI is not
  an abdomen study, even though the vertebrae lie inside the abdomen's outline.
* The hip joint lies in the lower limb and the pelvis; the shoulder in the upper limb.
* Codes are canonicalised: legacy concepts (``51185008`` Thorax, ``113345001`` Abdomen,
  ``12921003`` Pelvis, ``416949008`` Abdomen and/or pelvis, SNOMED-RT ``T-D3000``...) map to the
  concepts the current Annex L uses, so old model cards and old headers still match.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import tomllib
import unicodedata
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

__all__ = [
    "AnatomyMatch",
    "AnatomyNormaliser",
    "Region",
    "default_normaliser",
    "relation",
    "similarity",
    "SOURCE_WEIGHTS",
]

TABLE_PATH = Path(__file__).parent / "data" / "anatomy.toml"
ENTIRE_BODY = "38266002"

# Attribute keyword -> how far its text is trusted (see the module docstring).
SOURCE_WEIGHTS: dict[str, float] = {
    "AnatomicRegionSequence": 1.0,
    "BodyPartExamined": 0.9,
    "ProtocolName": 0.75,
    "SeriesDescription": 0.75,
    "PerformedProcedureStepDescription": 0.6,
    "RequestedProcedureDescription": 0.6,
    "StudyDescription": 0.6,
    "ProcedureCodeSequence": 0.6,
}
# Free-text attributes read by normalise_dataset, most trusted first.
_TEXT_SOURCES = (
    "BodyPartExamined",
    "ProtocolName",
    "SeriesDescription",
    "PerformedProcedureStepDescription",
    "RequestedProcedureDescription",
    "StudyDescription",
)

# Match qualities (multiplied by the source weight).
Q_EXACT = 1.0
Q_ABBR = 0.9
Q_CAMEL = 0.95  # factor for words found by splitting CamelCase ("ThxRoutine")
Q_LEVEL = 0.7  # vertebra level such as L4 or C5
Q_PREFIX = 0.65  # a word cut short (BodyPartExamined is at most 16 characters)
Q_FUZZY = 0.6  # one typo in a long word
Q_SUBSTRING = 0.6  # a known word inside a longer token ("CTTHORAXABDOMEN")
Q_GENERIC = 0.8  # factor for catch-all regions such as EXTREMITY
# Each further distinct region in one text loses this much: the first-named region is usually
# the examined one ("KNEE, compare HIP").
POSITION_DECAY = 0.01
# A region found by several attributes gains this much per further attribute (at most twice),
# so that two free-text fields agreeing beat one that disagrees, but never beat a higher tier.
CORROBORATION = 0.03
_MAX_CACHE = 8192
_JOINED = 10  # priority offset of phrases written without separators

# Coded laterality in AnatomicRegionModifierSequence.
_LATERALITY_CODES = {"7771000": "L", "24028007": "R", "51440002": "B"}


@dataclass(frozen=True)
class Region:
    """An anatomic region: SNOMED CT concept id, its meaning and its Annex L term ("" if none)."""

    code: str
    meaning: str
    body_part: str = ""


@dataclass(frozen=True)
class AnatomyMatch:
    """A region read from a header, how sure we are (0..1), and where it came from."""

    region: Region
    confidence: float
    source: str = ""  # attribute keyword, e.g. "BodyPartExamined"
    text: str = ""  # the raw text (or "CODE^SCHEME^meaning" for coded items)
    laterality: str = ""  # "L" / "R" / "B" / ""


# --------------------------------------------------------------------------- text handling

_GERMAN = str.maketrans({"Ä": "AE", "Ö": "OE", "Ü": "UE", "ß": "SS", "ä": "AE", "ö": "OE", "ü": "UE"})
_CAMEL_RE = re.compile(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_SPLIT_RE = re.compile(r"[^A-Z0-9]+")
_LEVEL_RE = re.compile(r"^(?:(C)[1-7]|(L)[1-5]|(TH)(?:1[0-2]|[1-9])|(HWK|BWK|LWK)\d{1,2})$")
_LEVEL_REGION = {"C": "CSPINE", "L": "LSPINE", "TH": "TSPINE", "HWK": "CSPINE", "BWK": "TSPINE",
                 "LWK": "LSPINE"}


def _strip_accents(text: str) -> str:
    """Upper case without diacritics: 'Tórax' -> 'TORAX', 'Schädel' -> 'SCHADEL'."""
    decomposed = unicodedata.normalize("NFKD", text.replace("ß", "ss"))
    return "".join(c for c in decomposed if not unicodedata.combining(c)).upper()


def _spellings(text: str) -> set[str]:
    """A synonym's spellings: without accents, and German umlauts transliterated (ä -> AE)."""
    return {_strip_accents(text), _strip_accents(text.translate(_GERMAN))}


def _raw_tokens(text: str) -> list[tuple[str, str]]:
    """(upper-case token, token as written) for each run of letters and digits."""
    out = []
    for raw in re.split(r"[^0-9A-Za-z\u00C0-\u024F]+", text):
        if raw:
            up = _strip_accents(raw)
            for piece in _SPLIT_RE.split(up):
                if piece:
                    out.append((piece, raw))
    return out


# --------------------------------------------------------------------------- the tables


@dataclass
class _Entry:
    """How a phrase maps to a region."""

    code: str
    quality: float
    laterality: str = ""
    priority: int = 0  # lower wins on a clash: site 0, table 1, Annex L term 2, meaning 3


@dataclass
class _Tables:
    """Everything precompiled from highdicom, pydicom, anatomy.toml and the site synonyms."""

    regions: dict[str, Region] = field(default_factory=dict)
    key_code: dict[str, str] = field(default_factory=dict)  # Annex L term / table key -> code
    alias: dict[str, str] = field(default_factory=dict)  # legacy code -> canonical code
    parents: dict[str, set[str]] = field(default_factory=dict)
    components: dict[str, frozenset[str]] = field(default_factory=dict)  # compound -> base codes
    overlaps: set[frozenset[str]] = field(default_factory=set)
    paired: set[str] = field(default_factory=set)
    phrases: dict[tuple[str, ...], _Entry] = field(default_factory=dict)
    max_phrase: int = 1
    words: set[str] = field(default_factory=set)  # every word of every phrase
    laterality: dict[str, str] = field(default_factory=dict)
    laterality_adjacent: dict[str, str] = field(default_factory=dict)  # only next to a region
    stopwords: set[str] = field(default_factory=set)
    noise: set[str] = field(default_factory=set)
    substring_ok: set[str] = field(default_factory=set)
    conflicts: list[str] = field(default_factory=list)
    annex_l: dict[str, str] = field(default_factory=dict)  # Annex L term -> code
    weak: dict[str, str] = field(default_factory=dict)  # word -> code when nothing else matches
    # derived
    ancestors: dict[str, dict[str, int]] = field(default_factory=dict)  # code -> {ancestor: depth}
    parts: dict[str, frozenset[str]] = field(default_factory=dict)  # compound -> its parts
    single_words: list[tuple[str, str]] = field(default_factory=list)  # (word, code), longest first
    deletions: dict[str, set[str]] = field(default_factory=dict)  # fuzzy: variant -> words


def _phrase_key(text: str, stopwords: set[str]) -> tuple[str, ...]:
    return tuple(t for t, _ in _raw_tokens(text) if t not in stopwords)


def _load_standard() -> tuple[dict[str, list[Any]], list[tuple[str, str, str]]]:
    """Annex L terms from highdicom and CID 4031 from pydicom: (term -> [scheme, code, meaning,
    paired]) and [(keyword, code, meaning)]."""
    # Located without importing highdicom (which would pull in half of its dependencies).
    spec = importlib.util.find_spec("highdicom")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("highdicom is needed for the PS3.16 Annex L table")
    path = Path(next(iter(spec.submodule_search_locations))) / "_standard" / "anatomic_regions.json"
    annex_l: dict[str, list[Any]] = json.loads(path.read_text(encoding="utf-8"))
    from pydicom.sr.codedict import codes

    cid = codes.cid4031
    cid4031 = []
    for keyword in cid.dir():
        code = getattr(cid, keyword)
        if code.scheme_designator in ("SCT", "SRT"):
            cid4031.append((keyword, str(code.value), str(code.meaning)))
    return annex_l, cid4031


def _srt_to_sct(code: str) -> str:
    """SNOMED-RT ids (T-D3000) as SNOMED CT concept ids, via pydicom's mapping."""
    from pydicom.sr._snomed_dict import mapping

    return str(mapping.get("SRT", {}).get(code, ""))


def _build(table: Mapping[str, Any], extra: Mapping[str, str] | None) -> _Tables:
    t = _Tables()
    tok = table.get("tokens", {})
    t.stopwords = {_strip_accents(w) for w in tok.get("stopwords", [])}
    t.noise = {_strip_accents(w) for w in tok.get("noise", [])}
    for lat, words in tok.get("laterality", {}).items():
        for w in words:
            for s in _spellings(w):
                t.laterality[s] = lat
    for lat, words in tok.get("laterality_adjacent", {}).items():
        for w in words:
            t.laterality_adjacent[_strip_accents(w)] = lat
    t.substring_ok = {_strip_accents(w) for w in tok.get("substring_short_words", [])}
    weak_words: dict[str, str] = dict(tok.get("weak", {}))

    annex_l, cid4031 = _load_standard()
    # 1. Regions from the standard. Several Annex L terms share a concept (CHEST and THORAX):
    # the region's body_part is the shortest non-"ENDO" term, unless the table names one.
    terms_of: dict[str, list[str]] = {}
    for term, (_scheme, code, meaning, paired) in annex_l.items():
        terms_of.setdefault(code, []).append(term)
        t.key_code[term] = code
        if code not in t.regions:
            t.regions[code] = Region(code, meaning, "")
        if paired:
            t.paired.add(code)
    for code, terms in terms_of.items():
        best = sorted(terms, key=lambda s: (s.startswith("ENDO"), len(s), s))[0]
        t.regions[code] = Region(code, str(annex_l[best][2]), best)
    t.annex_l = {term: t.alias.get(str(v[1]), str(v[1])) for term, v in annex_l.items()}
    for keyword, code, meaning in cid4031:
        t.key_code.setdefault(keyword.upper(), code)
        t.regions.setdefault(code, Region(code, meaning, ""))

    # 2. Regions and words from anatomy.toml.
    regions_tbl: dict[str, dict[str, Any]] = table.get("region", {})
    for key, spec in regions_tbl.items():
        code = str(spec.get("code") or t.key_code.get(key, ""))
        if not code:
            raise ValueError(f"anatomy.toml: region {key!r} has no code and is no Annex L term")
        old = t.regions.get(code)
        meaning = str(spec.get("meaning") or (old.meaning if old else key.title()))
        body_part = str(spec.get("body_part", old.body_part if old else ""))
        t.regions[code] = Region(code, meaning, body_part)
        t.key_code[key] = code
        if spec.get("paired"):
            t.paired.add(code)
        for a in spec.get("alias_codes", []):
            t.alias[str(a)] = code

    def resolve(ref: str) -> str:
        ref = str(ref)
        if ref in t.key_code:
            return t.key_code[ref]
        if ref in t.regions:
            return ref
        if ref in t.alias:
            return t.alias[ref]
        raise ValueError(f"anatomy.toml: unknown region reference {ref!r}")

    # [containment]: parents of regions that need no synonyms of their own (Annex L vessels...).
    for child, parents in table.get("containment", {}).items():
        for p in parents:
            t.parents.setdefault(resolve(child), set()).add(resolve(p))
    for key, spec in regions_tbl.items():
        code = t.key_code[key]
        for p in spec.get("parents", []):
            t.parents.setdefault(code, set()).add(resolve(p))
        for o in spec.get("overlaps", []):
            t.overlaps.add(frozenset((code, resolve(o))))
        if "components" in spec:
            t.components[code] = frozenset(resolve(c) for c in spec["components"])

    # 3. Phrases. Lower priority number wins; a clash between equals is recorded (a test keeps
    # the shipped table free of them).
    def add(text: str, code: str, quality: float, priority: int, lat: str = "") -> None:
        for spelling in _spellings(text):
            key = _phrase_key(spelling, t.stopwords)
            # A noise word is never a region on its own ("FACE" is the French frontal view),
            # unless a site says so.
            if not key or (len(key) == 1 and key[0] in t.noise and priority > 0):
                continue
            if len(key) > 1 and priority < _JOINED:
                # Vendors drop the separators of CS values: LOWER EXTREMITY -> LOWEREXTREMITY.
                joined.append(("".join(key), code, quality, priority + _JOINED, lat))
            old = t.phrases.get(key)
            if old is not None:
                if old.priority < priority or old.code == code:
                    if old.code == code and old.priority == priority:
                        old.quality = max(old.quality, quality)
                    continue
                if old.priority == priority:
                    if priority < _JOINED:
                        t.conflicts.append(f"{' '.join(key)}: {old.code} vs {code}")
                    continue
            t.phrases[key] = _Entry(code, quality, lat, priority)

    joined: list[tuple[str, str, float, int, str]] = []

    if extra:
        for text, target in extra.items():
            code = _resolve_target(t, str(target))
            if code is None:
                raise ValueError(f"anatomy synonym {text!r}: {target!r} is no known term or code")
            words = [w for w, _ in _raw_tokens(text)]
            lat = next((t.laterality.get(w) or t.laterality_adjacent.get(w, "") for w in words
                        if w in t.laterality or w in t.laterality_adjacent), "")
            add(text, code, Q_EXACT, 0, lat or "")
    for key, spec in regions_tbl.items():
        code = t.key_code[key]
        for lang in ("en", "de", "fr", "it", "es", "vendor"):
            for w in spec.get(lang, []):
                add(w, code, Q_EXACT, 1)
        for w in spec.get("abbr", []):
            add(w, code, Q_ABBR, 1)
    for term, (_s, code, _m, _p) in annex_l.items():
        add(term, t.alias.get(code, code), Q_EXACT, 2)
    for key, code in t.key_code.items():
        add(key, t.alias.get(code, code), Q_EXACT, 2)
    for _term, (_s, code, meaning, _p) in annex_l.items():
        add(str(meaning), t.alias.get(code, code), Q_EXACT, 3)
    for code, region in list(t.regions.items()):
        add(region.meaning, t.alias.get(code, code), Q_EXACT, 3)
    for text, code, quality, priority, lat in joined:
        add(text, code, quality, priority, lat)

    # Catch-all regions (EXTREMITY is many a radiography system's default) count less, so that
    # a specific region named by a less trusted attribute comes first.
    generic = {t.key_code[k] for k, spec in regions_tbl.items() if spec.get("generic")}
    generic |= {resolve(k) for k in table.get("generic", {}).get("terms", [])}
    for entry in t.phrases.values():
        if entry.code in generic and entry.priority > 0:
            entry.quality = round(entry.quality * Q_GENERIC, 4)

    t.weak = {_strip_accents(w): resolve(k) for w, k in weak_words.items()}
    t.max_phrase = max(len(k) for k in t.phrases)
    for k in t.phrases:
        t.words.update(k)

    _derive(t)
    return t


def _resolve_target(t: _Tables, target: str) -> str | None:
    """An Annex L term, table key or SNOMED CT code -> canonical code."""
    up = _strip_accents(target).strip()
    compact = up.replace(" ", "")
    for cand in (target.strip(), up, compact):
        if cand in t.key_code:
            return t.alias.get(t.key_code[cand], t.key_code[cand])
        if cand in t.alias:
            return t.alias[cand]
        if cand in t.regions:
            return cand
    return None


def _derive(t: _Tables) -> None:
    """Containment closure, compound parts and the fallback indexes."""
    # Compound regions: expand components to base regions, then link every region to the
    # smallest compounds that strictly contain its base set (chest < chest-abdomen < CAP, not
    # chest < CAP directly, so that CAP is two steps from chest and one from chest-abdomen).
    def base(code: str, seen: frozenset[str] = frozenset()) -> frozenset[str]:
        if code not in t.components or code in seen:
            return frozenset((code,))
        return frozenset().union(*(base(c, seen | {code}) for c in t.components[code]))

    bases = {c: base(c) for c in t.components}
    members: set[str] = set()
    for b in bases.values():
        members |= b
    for x in members | set(bases):
        bx = bases.get(x, frozenset((x,)))
        bigger = [c for c, bc in bases.items() if c != x and bx < bc]
        minimal = [c for c in bigger if not any(bases[d] < bases[c] for d in bigger if d != c)]
        for c in minimal:
            t.parents.setdefault(x, set()).add(c)
    for c, bc in bases.items():
        t.parts[c] = frozenset(x for x in members | set(bases)
                               if x != c and bases.get(x, frozenset((x,))) <= bc)

    # Everything without a parent lies in the entire body (except the body itself and phantoms).
    for code in t.regions:
        if code not in t.parents and code not in (ENTIRE_BODY, "706342009") and code not in t.alias:
            t.parents[code] = {ENTIRE_BODY}

    for code in t.regions:
        depth: dict[str, int] = {}
        queue = deque([(code, 0)])
        while queue:
            cur, d = queue.popleft()
            for p in t.parents.get(cur, ()):
                if p not in depth and p != code:
                    depth[p] = d + 1
                    queue.append((p, d + 1))
        t.ancestors[code] = depth

    singles: dict[str, str] = {}
    for key, entry in t.phrases.items():
        if len(key) == 1 and not key[0].isdigit():
            singles[key[0]] = entry.code
    t.single_words = sorted(
        ((w, c) for w, c in singles.items() if len(w) >= 5 or w in t.substring_ok),
        key=lambda wc: (-len(wc[0]), wc[0]),
    )
    for w in singles:
        if len(w) >= 6 and t.phrases[(w,)].quality >= Q_EXACT:
            for variant in {w} | {w[:i] + w[i + 1:] for i in range(len(w))}:
                t.deletions.setdefault(variant, set()).add(w)


def _one_edit(a: str, b: str) -> bool:
    """True when a and b differ by one insertion, deletion, substitution or transposition."""
    if a == b:
        return True
    if abs(len(a) - len(b)) > 1:
        return False
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    if len(a) == len(b):
        return a[i + 1:] == b[i + 1:] or (a[i + 2:] == b[i + 2:] and a[i:i + 2] == b[i:i + 2][::-1])
    return a[i + 1:] == b[i:] if len(a) > len(b) else a[i:] == b[i + 1:]


@functools.cache
def _table_file() -> dict[str, Any]:
    with TABLE_PATH.open("rb") as fh:
        return tomllib.load(fh)


@functools.cache
def _base_tables() -> _Tables:
    return _build(_table_file(), None)


# --------------------------------------------------------------------------- relations


def _canon(code: str) -> str:
    t = _base_tables()
    code = str(code).strip()
    if code in t.alias:
        return t.alias[code]
    if code not in t.regions and code[:2] in ("T-", "R-", "G-"):
        sct = _srt_to_sct(code)
        if sct:
            return t.alias.get(sct, sct)
    return code


@functools.lru_cache(maxsize=65536)
def _relation(a: str, b: str) -> tuple[str, int]:
    t = _base_tables()
    a, b = _canon(a), _canon(b)
    if a == b:
        return "exact", 0
    if a in t.ancestors.get(b, {}):
        return "contains", t.ancestors[b][a]
    if b in t.ancestors.get(a, {}):
        return "contained", t.ancestors[a][b]
    if frozenset((a, b)) in t.overlaps:
        return "overlaps", 0
    # Parts of one compound region (chest and abdomen in chest-abdomen-pelvis), ignoring the
    # entire body: everything lies in it, so it says nothing.
    for parts in t.parts.values():
        if a in parts and b in parts:
            return "overlaps", 0
    return "none", 0


def relation(a_code: str, b_code: str) -> str:
    """How region ``a`` relates to ``b``: exact, contains (b lies in a), contained, overlaps, none."""
    return _relation(str(a_code), str(b_code))[0]


def similarity(a_code: str, b_code: str) -> float:
    """1.0 exact; 0.75 for direct containment, 0.1 less per further level (floor 0.5);
    0.4 overlapping parts of a compound region; 0.0 otherwise. Symmetric."""
    rel, depth = _relation(str(a_code), str(b_code))
    if rel == "exact":
        return 1.0
    if rel in ("contains", "contained"):
        return max(0.5, 0.75 - 0.1 * (depth - 1))
    if rel == "overlaps":
        return 0.4
    return 0.0


# --------------------------------------------------------------------------- the normaliser


@dataclass
class _Hit:
    code: str
    quality: float
    start: int  # first token index
    end: int  # one past the last token index
    laterality: str = ""


class AnatomyNormaliser:
    """Maps header text and codes to SNOMED CT regions. Build once, reuse (results are cached)."""

    def __init__(self, extra_synonyms: Mapping[str, str] | None = None) -> None:
        self._t = _build(_table_file(), extra_synonyms) if extra_synonyms else _base_tables()
        self._cache: dict[tuple[str, str], tuple[AnatomyMatch, ...]] = {}

    # ---- lookups

    def region(self, code_or_term: str) -> Region | None:
        """The region for a SNOMED CT code, an Annex L term, a table key or a known phrase."""
        t = self._t
        if not code_or_term or not str(code_or_term).strip():
            return None
        code = _resolve_target(t, str(code_or_term))
        if code is None:
            key = _phrase_key(str(code_or_term), t.stopwords)
            entry = t.phrases.get(key)
            code = entry.code if entry else None
        if code is None and str(code_or_term).strip()[:2] in ("T-", "R-", "G-"):
            sct = _srt_to_sct(str(code_or_term).strip())
            code = t.alias.get(sct, sct) if sct else None
        return t.regions.get(code) if code else None

    @property
    def table_sizes(self) -> dict[str, int]:
        t = self._t
        return {"regions": len(t.regions), "phrases": len(t.phrases), "aliases": len(t.alias),
                "compounds": len(t.components), "containment_links": sum(map(len, t.parents.values()))}

    # ---- text

    def normalise_text(self, text: str, source: str = "") -> list[AnatomyMatch]:
        """Regions named in ``text``, best first. With a known ``source`` keyword, confidences are
        scaled by that attribute's weight; otherwise they are the bare match quality."""
        text = str(text or "")
        key = (text, source)
        cached = self._cache.get(key)
        if cached is None:
            cached = self._normalise_text(text, source)
            if len(self._cache) >= _MAX_CACHE:
                self._cache.clear()
            self._cache[key] = cached
        return list(cached)

    def _normalise_text(self, text: str, source: str) -> tuple[AnatomyMatch, ...]:
        if not text.strip():
            return ()
        weight = SOURCE_WEIGHTS.get(source, 1.0)
        if source == "BodyPartExamined":
            # A defined term is what the standard says it is, whatever the word means elsewhere
            # (FACE is also the French frontal view, HEPATICA Italian for "of the liver").
            term = "".join(_SPLIT_RE.split(_strip_accents(text)))
            code = self._t.annex_l.get(term)
            entry = self._t.phrases.get((term,))
            if code is not None and (entry is None or entry.priority > 0):
                quality = entry.quality if entry is not None and entry.code == code else Q_EXACT
                region = self._t.regions[code]
                return (AnatomyMatch(region, round(weight * quality, 4), source, text),)
        hits, lats = self._scan(text)
        if not hits:
            words = [w for w, _ in _raw_tokens(text)]
            hits = [_Hit(self._t.weak[w], Q_ABBR, i, i + 1) for i, w in enumerate(words)
                    if w in self._t.weak][:1]
            if not hits:
                return ()
        hits = self._compounds(hits)
        self._lateralise(hits, lats)
        best: dict[str, tuple[float, int, _Hit]] = {}
        for h in sorted(hits, key=lambda h: h.start):
            if h.code not in best or h.quality > best[h.code][0]:
                best[h.code] = (h.quality, best.get(h.code, (0, len(best), h))[1], h)
        out = []
        for code, (q, order, h) in best.items():
            conf = round(weight * q * (1.0 - POSITION_DECAY * min(order, 5)), 4)
            out.append(AnatomyMatch(self._t.regions[code], conf, source, text,
                                    h.laterality if code in self._t.paired else ""))
        out.sort(key=lambda m: (-m.confidence, m.region.code))
        return tuple(out)

    def _tokens(self, text: str) -> list[tuple[str, float]]:
        """Tokens with a quality factor: CamelCase is split only where the whole word is unknown."""
        t = self._t
        out: list[tuple[str, float]] = []
        for up, raw in _raw_tokens(text):
            if up in t.stopwords:
                continue
            known = up in t.words or up in t.noise or up in t.laterality
            if not known and up == _strip_accents(raw) and raw != raw.upper() and raw != raw.lower():
                pieces = [p for p in _CAMEL_RE.split(raw) if p]
                if len(pieces) > 1:
                    for p in pieces:
                        for q in _SPLIT_RE.split(_strip_accents(p)):
                            if q and q not in t.stopwords:
                                out.append((q, Q_CAMEL))
                    continue
            out.append((up, 1.0))
        return out

    def _scan(self, text: str) -> tuple[list[_Hit], list[tuple[int, str, str]]]:
        """Greedy longest phrase match, then fallbacks for the words left over."""
        t = self._t
        toks = self._tokens(text)
        words = [w for w, _ in toks]
        hits: list[_Hit] = []
        used = [False] * len(words)
        i = 0
        while i < len(words):
            for n in range(min(t.max_phrase, len(words) - i), 0, -1):
                entry = t.phrases.get(tuple(words[i:i + n]))
                if entry is not None:
                    q = entry.quality * min(f for _, f in toks[i:i + n])
                    hits.append(_Hit(entry.code, q, i, i + n, entry.laterality))
                    for j in range(i, i + n):
                        used[j] = True
                    i += n
                    break
            else:
                i += 1
        # (index, laterality, how it must touch a region: "" anywhere, "next" right beside it,
        # "after" right after it: DX before a region is the modality, after it "destro").
        lats: list[tuple[int, str, str]] = []
        for i, w in enumerate(words):
            if used[i]:
                continue
            if w in t.laterality:
                lats.append((i, t.laterality[w], ""))
                used[i] = True
            elif w in t.laterality_adjacent:
                lats.append((i, t.laterality_adjacent[w], "after" if w in t.noise else "next"))
        for i, w in enumerate(words):
            if used[i] or w in t.noise or w in t.laterality_adjacent or w.isdigit():
                continue
            hits.extend(self._fallback(w, i))
        return hits, lats

    def _fallback(self, w: str, i: int) -> list[_Hit]:
        """A word no phrase knows: vertebra level, typo, truncation, or words inside it."""
        t = self._t
        m = _LEVEL_RE.match(w)
        if m:
            prefix = next(g for g in m.groups() if g)
            return [_Hit(t.key_code[_LEVEL_REGION[prefix]], Q_LEVEL, i, i + 1)]
        if len(w) < 4 or w[0].isdigit():
            return []
        if len(w) >= 6:
            cands: set[str] = set()
            for variant in {w} | {w[:k] + w[k + 1:] for k in range(len(w))}:
                for word in t.deletions.get(variant, ()):
                    if _one_edit(w, word):
                        cands.add(t.phrases[(word,)].code)
            if len(cands) == 1:
                return [_Hit(next(iter(cands)), Q_FUZZY, i, i + 1)]
        found: list[tuple[int, int, str]] = []
        for word, code in t.single_words:
            if len(word) > len(w):
                continue
            start = w.find(word)
            while start >= 0:
                end = start + len(word)
                if not any(s < end and start < e for s, e, _ in found):
                    found.append((start, end, code))
                start = w.find(word, start + 1)
        hits = [_Hit(code, Q_SUBSTRING, i, i + 1) for _s, _e, code in sorted(found)]
        # A CS value cut at 16 characters ends in a truncated word: CHESTABDOMENPELV.
        tail = w[max((e for _s, e, _c in found), default=0):]
        if len(tail) >= (3 if found else 5):
            # The shortest word it begins decides ("PELV" -> PELVI, not PELVISANDLOWEREXTREMITIES),
            # and it must be most of that word ("ENDO" is no cut-short ENDORALE).
            cands = sorted((len(word), c) for word, c in t.single_words if word.startswith(tail))
            codes = {c for n, c in cands if n == cands[0][0] and len(tail) >= 0.6 * n}
            if len(codes) == 1:
                hits.append(_Hit(codes.pop(), Q_PREFIX if not found else Q_SUBSTRING, i, i + 1))
        return hits

    def _compounds(self, hits: list[_Hit]) -> list[_Hit]:
        """Collapse parts named together into the compound region: THORAX ABDOMEN -> 416550000."""
        t = self._t
        if len(hits) < 2 or not t.components:
            return hits
        while True:
            present: dict[str, list[_Hit]] = {}
            for h in hits:
                present.setdefault(h.code, []).append(h)
            expanded: dict[str, set[str]] = {}  # base code -> codes of hits providing it
            for code in present:
                for b in t.parts.get(code, frozenset()) | {code}:
                    if b in t.parts and b != code:
                        continue
                    if code in t.components and b == code:
                        continue
                    expanded.setdefault(b, set()).add(code)
            best: tuple[int, str] | None = None
            for comp, parts in t.parts.items():
                base_parts = {p for p in parts if p not in t.parts}
                if not base_parts or not base_parts <= set(expanded):
                    continue
                providers = set().union(*(expanded[b] for b in base_parts))
                if len(providers) < 2 or comp in present:
                    continue
                cand = (len(base_parts), comp)
                if best is None or cand[0] > best[0]:
                    best = cand
            if best is None:
                return self._absorb(hits)
            comp = best[1]
            base_parts = {p for p in t.parts[comp] if p not in t.parts}
            providers = set().union(*(expanded[b] for b in base_parts))
            used = [h for h in hits if h.code in providers]
            rest = [h for h in hits if h.code not in providers]
            merged = _Hit(comp, min(h.quality for h in used), min(h.start for h in used),
                          max(h.end for h in used),
                          next((h.laterality for h in used if h.laterality), ""))
            hits = rest + [merged]

    def _absorb(self, hits: list[_Hit]) -> list[_Hit]:
        """Drop parts of a compound named in the same text: "Thorax^ThxAbd" is chest-abdomen."""
        t = self._t
        compounds = {h.code for h in hits if h.code in t.parts}
        if not compounds:
            return hits
        covered = set().union(*(t.parts[c] for c in compounds))
        kept = [h for h in hits if h.code not in covered]
        for h in kept:
            if h.code in compounds:
                parts = [p for p in hits if p.code in t.parts[h.code]]
                if parts:
                    h.start = min([h.start] + [p.start for p in parts])
                    h.laterality = h.laterality or next((p.laterality for p in parts if p.laterality), "")
        return kept

    def _lateralise(self, hits: list[_Hit], lats: list[tuple[int, str, str]]) -> None:
        """Give each region the nearest laterality word; single letters only right beside it."""
        for h in hits:
            if h.laterality:
                continue
            best: tuple[int, str] | None = None
            for idx, lat, touch in lats:
                dist = h.start - idx if idx < h.start else idx - h.end + 1
                if touch and (dist != 1 or (touch == "after" and idx < h.start)):
                    continue
                if best is None or dist < best[0]:
                    best = (dist, lat)
            if best is not None:
                h.laterality = best[1]

    # ---- datasets

    def _coded(self, item: Dataset, source: str) -> AnatomyMatch | None:
        t = self._t
        value = str(item.get("CodeValue", "") or item.get("LongCodeValue", "") or "").strip()
        scheme = str(item.get("CodingSchemeDesignator", "") or "").strip().upper()
        meaning = str(item.get("CodeMeaning", "") or "")
        text = f"{value}^{scheme}^{meaning}"
        lat = ""
        for mod in item.get("AnatomicRegionModifierSequence", []) or []:
            lat = _LATERALITY_CODES.get(str(mod.get("CodeValue", "")), lat)
        code = ""
        if scheme in ("SCT", "SNM3", "99SDM") and value:
            code = t.alias.get(value, value)
        elif scheme == "SRT" and value:
            sct = _srt_to_sct(value) or value
            code = t.alias.get(sct, sct)
        if code in t.regions:
            return AnatomyMatch(t.regions[code], SOURCE_WEIGHTS["AnatomicRegionSequence"], source,
                                text, lat if code in t.paired else "")
        # An unknown code: trust its meaning as text, a little less than a known code.
        found = self.normalise_text(meaning) if meaning else []
        if found:
            m = found[0]
            return AnatomyMatch(m.region, round(0.95 * m.confidence, 4), source, text,
                                lat or m.laterality)
        if code:
            return AnatomyMatch(Region(code, meaning, ""), 0.9, source, text, lat)
        return None

    def normalise_dataset(self, ds: Dataset) -> list[AnatomyMatch]:
        """Every distinct region the headers name, with its best confidence, best first."""
        found: list[AnatomyMatch] = []
        coded_items: list[tuple[Dataset, str]] = []
        for item in ds.get("AnatomicRegionSequence", []) or []:
            coded_items.append((item, "AnatomicRegionSequence"))
        for group in ("SharedFunctionalGroupsSequence",):
            for fg in ds.get(group, []) or []:
                for fa in fg.get("FrameAnatomySequence", []) or []:
                    for item in fa.get("AnatomicRegionSequence", []) or []:
                        coded_items.append((item, "AnatomicRegionSequence"))
        for item, source in coded_items:
            m = self._coded(item, source)
            if m is not None:
                found.append(m)
        texts: list[tuple[str, str]] = []
        for keyword in _TEXT_SOURCES:
            value = ds.get(keyword, None)
            if value:
                texts.append((keyword, str(value)))
        for req in ds.get("RequestAttributesSequence", []) or []:
            value = req.get("RequestedProcedureDescription", None)
            if value:
                texts.append(("RequestedProcedureDescription", str(value)))
        for item in ds.get("ProcedureCodeSequence", []) or []:
            value = item.get("CodeMeaning", None)
            if value:
                texts.append(("ProcedureCodeSequence", str(value)))
        for keyword, value in texts:
            found.extend(self.normalise_text(value, keyword))
        if not found:
            return []
        ds_lat = str(ds.get("Laterality", "") or ds.get("ImageLaterality", "") or "").strip().upper()
        ds_lat = ds_lat if ds_lat in ("L", "R", "B") else ""
        return _merge(found, ds_lat, self._t.paired)

    def best(self, ds: Dataset) -> AnatomyMatch | None:
        """The most trusted region of a dataset, or None."""
        found = self.normalise_dataset(ds)
        return found[0] if found else None


def _merge(found: Iterable[AnatomyMatch], ds_lat: str, paired: set[str]) -> list[AnatomyMatch]:
    """One match per region: its best, raised a little when other attributes agree."""
    by_code: dict[str, list[AnatomyMatch]] = {}
    for m in found:
        by_code.setdefault(m.region.code, []).append(m)
    out = []
    for code, ms in by_code.items():
        ms.sort(key=lambda m: -m.confidence)
        top = ms[0]
        sources = {m.source for m in ms}
        conf = top.confidence
        if top.source != "AnatomicRegionSequence":
            conf = min(0.99, conf + CORROBORATION * min(2, len(sources) - 1))
        lat = top.laterality or next((m.laterality for m in ms if m.laterality), "")
        if not lat and code in paired:
            lat = ds_lat
        out.append(AnatomyMatch(top.region, round(conf, 4), top.source, top.text, lat))
    out.sort(key=lambda m: (-m.confidence, m.region.code))
    return out


@functools.cache
def default_normaliser() -> AnatomyNormaliser:
    """The normaliser with the shipped table only (shared, cached)."""
    return AnatomyNormaliser()


# AnatomyMatch.source of a reading from the images (models.image_check). Here, with the reading
# itself, so that models/ and node/ share them without models importing the node.
IMAGE_SOURCE = "image check"


@dataclass(frozen=True)
class ImageReading:
    """What a body-part classifier read from the images of a series: every class's probability.

    ``classes`` holds (class label, region, probability) for each class of the model whose type
    the anatomy table knows, probabilities averaged over the series' images."""

    classifier: str  # the model's name
    classes: tuple[tuple[str, Region, float], ...]

    def best(self) -> tuple[str, Region, float]:
        return max(self.classes, key=lambda c: (c[2], c[1].code))

    def probability_of(self, code: str, min_similarity: float) -> tuple[float, list[str]]:
        """Probability the image gives region ``code``: the sum over the classes whose region is
        ``code``, contains it or lies inside it (similarity >= ``min_similarity``), with their labels.
        A KNEE header is read against the "limb" class (Extremity contains Knee)."""
        p, labels = 0.0, []
        for label, region, prob in self.classes:
            if similarity(code, region.code) >= min_similarity:
                p += prob
                labels.append(label)
        return p, labels
