"""Model selection: which registered model fits a series, ranked, with the reasons written out.

The algorithm, in the order a reader of an explanation sees it:

1. **Hard constraints** reject a model outright: modality; pixel data present; channels and
   photometric interpretation; 2D or 3D input and the minimum number of slices; laterality;
   site rules ``exclude`` and ``route`` (by called AE title); anatomy below ``min_anatomy``.
2. **Score** the rest (points, higher is better):

   ======================  ======  ====================================================
   rule                    points  meaning
   ======================  ======  ====================================================
   anatomy                 0..60   60 x similarity x confidence of the best pair of
                                   (series anatomy, model anatomy): exact 1.0, contains
                                   or contained 0.5-0.75, overlapping regions 0.4
   finding                 0 / 25  the request names a finding the model targets
   version                 0..10   10 the newest validated version of that model name,
                                   5 a newer but unvalidated one, 0 an older one
   laterality              0 / 3   the model's laterality equals the series'
   site pin                1000    a site rule pins the model
   ======================  ======  ====================================================

3. **Order** by score, then name, newest version and UID, so the same input always gives the
   same ranking. An empty ranking is an explicit "no suitable model" with each model's reasons.

A version is *validated* when its card reports performance figures (``provenance.performance``).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from pydicom.dataset import Dataset

from iods import anatomy
from iods.anatomy import IMAGE_SOURCE, ImageReading
from iods.card import Code, ModelCard
from models.volume import has_slice_geometry
from node.config import SelectionSection, SiteRule

ANATOMY_POINTS = 60.0
FINDING_POINTS = 25.0
VERSION_POINTS = 10.0
UNVALIDATED_NEWER_POINTS = 5.0
LATERALITY_POINTS = 3.0
PIN_POINTS = 1000.0

# Free-text words for the findings models commonly target, in the five languages the anatomy
# table covers, keyed by SNOMED CT concept. Coded requests need none of this.
FINDING_WORDS: dict[str, tuple[str, ...]] = {
    "27925004": ("nodule", "nodules", "rundherd", "rundherde", "knoten", "nodulo", "noduli", "nodulos", "rh"),
    "36118008": ("pneumothorax", "pneumothorace", "neumotorax", "ptx"),
    "125605004": ("fracture", "fraktur", "frattura", "fractura", "fx"),
    "4147007": ("mass", "raumforderung", "masse", "massa", "masa"),
    "233604007": ("pneumonia", "pneumonie", "polmonite", "neumonia"),
    "59282003": ("embolism", "embolie", "embolia", "pe", "lae", "lungenembolie"),
    "50960005": ("hemorrhage", "haemorrhage", "blutung", "hemorragie", "emorragia", "hemorragia", "ich"),
    "108369006": ("tumor", "tumour", "neoplasm", "tumeur", "tumore"),
}


@dataclass(frozen=True)
class Contradiction:
    """The header names one region, the images another (see :func:`find_contradiction`)."""

    header_region: str  # meaning, e.g. "Knee"
    header_code: str
    header_source: str  # e.g. "BodyPartExamined 'KNEE'"
    header_confidence: float
    classifier: str
    header_probability: float  # what the image gives the header's region
    header_classes: tuple[str, ...]  # the classifier's classes that count for it
    image_region: str  # meaning of the image's most probable class
    image_code: str
    image_label: str
    image_probability: float
    policy: str = "hold"

    def describe(self) -> str:
        counted = "/".join(self.header_classes)
        return (f"the header says {self.header_region} ({self.header_source}, confidence "
                f"{self.header_confidence:.2f}) but the image check ({self.classifier}) gives it p="
                f"{self.header_probability:.2f}" + (f" (class {counted})" if counted else "")
                + f" and {self.image_region} p={self.image_probability:.2f} (class {self.image_label})")


def find_contradiction(
    header: Sequence[anatomy.AnatomyMatch],
    readings: Sequence[ImageReading],
    *,
    below: float,
    other: float,
    min_similarity: float = 0.5,
) -> Contradiction | None:
    """The header's region against the images' probabilities for it.

    The header's claim is its most trusted region (AnatomicRegionSequence, then
    BodyPartExamined, then the descriptions). It is contradicted when a classifier that has a
    class for it (the region, or one containing it or inside it) gives it less than ``below``
    while another region reaches ``other``. A region the classifier has no class for (a spine)
    cannot be contradicted; an empty header has nothing to contradict.
    """
    if not header or not readings:
        return None
    claim = max(header, key=lambda m: (m.confidence, m.region.code))
    for reading in readings:
        p, labels = reading.probability_of(claim.region.code, min_similarity)
        if not labels:
            continue
        label, region, prob = reading.best()
        if p < below and prob >= other and anatomy.similarity(claim.region.code, region.code) < min_similarity:
            return Contradiction(
                header_region=claim.region.meaning, header_code=claim.region.code,
                header_source=f"{claim.source} {claim.text!r}", header_confidence=claim.confidence,
                classifier=reading.classifier, header_probability=round(p, 3), header_classes=tuple(labels),
                image_region=region.meaning, image_code=region.code, image_label=label,
                image_probability=round(prob, 3))
    return None


@dataclass(frozen=True)
class SeriesFacts:
    """What the selection knows about one series (or study, when grouped by study)."""

    modality: str
    anatomy: tuple[anatomy.AnatomyMatch, ...] = ()
    requested_findings: tuple[str, ...] = ()  # SNOMED CT concept ids
    finding_text: str = ""  # free-text Reason for the Requested Procedure
    slices: int = 1
    samples_per_pixel: int = 1
    photometric: str = "MONOCHROME2"
    has_pixels: bool = True
    volumetric: bool = False  # slices carry a consistent patient geometry
    laterality: str = ""
    called_ae: str = ""
    contradiction: Contradiction | None = None
    # What the selection does with a contradiction, decided by a person (``modelnode jobs
    # retry --trust`` or ``--model``): "" follows the site's policy.
    decided: str = ""

    @classmethod
    def from_datasets(
        cls,
        datasets: Sequence[Dataset],
        *,
        normaliser: anatomy.AnatomyNormaliser | None = None,
        called_ae: str = "",
        findings: Iterable[str] = (),
        image_anatomy: Iterable[anatomy.AnatomyMatch] = (),
        image_readings: Sequence[ImageReading] = (),
        settings: SelectionSection | None = None,
    ) -> SeriesFacts:
        """Facts from the instances of a series. ``image_anatomy`` adds an image-based check;
        ``image_readings`` (every class's probability) are checked against the header's region
        with ``settings``' thresholds (:func:`find_contradiction`)."""
        if not datasets:
            raise ValueError("a series needs at least one instance")
        first = datasets[0]
        norm = normaliser or anatomy.default_normaliser()
        header = norm.normalise_dataset(first)
        settings = settings or SelectionSection()
        contradiction = find_contradiction(header, image_readings, below=settings.contradiction_below,
                                           other=settings.contradiction_other, min_similarity=settings.min_anatomy)
        if contradiction is not None:
            contradiction = replace(contradiction, policy=settings.contradiction_policy(called_ae))
        matches = {m.region.code: m for m in header}
        for m in image_anatomy:
            if m.region.code not in matches or matches[m.region.code].confidence < m.confidence:
                matches[m.region.code] = m
        ordered = tuple(sorted(matches.values(), key=lambda m: (-m.confidence, m.region.code)))
        frames = sum(int(ds.get("NumberOfFrames", 1) or 1) for ds in datasets)
        volumetric = has_slice_geometry(datasets)
        coded = list(findings)
        for keyword in ("ReasonForRequestedProcedureCodeSequence", "RequestedProcedureCodeSequence"):
            for item in first.get(keyword, []) or []:
                if item.get("CodingSchemeDesignator") in ("SCT", "SRT") and item.get("CodeValue"):
                    coded.append(str(item.CodeValue))
        for req in first.get("RequestAttributesSequence", []) or []:
            for item in req.get("ReasonForRequestedProcedureCodeSequence", []) or []:
                if item.get("CodeValue"):
                    coded.append(str(item.CodeValue))
        texts = [str(first.get("ReasonForTheRequestedProcedure", "") or "")]
        for req in first.get("RequestAttributesSequence", []) or []:
            texts.append(str(req.get("ReasonForTheRequestedProcedure", "") or ""))
        laterality = str(first.get("Laterality", "") or first.get("ImageLaterality", "") or "")
        if not laterality:
            laterality = next((m.laterality for m in ordered if m.laterality), "")
        return cls(
            modality=str(first.get("Modality", "") or ""),
            anatomy=ordered,
            requested_findings=tuple(dict.fromkeys(coded)),
            finding_text=" ".join(t for t in texts if t),
            slices=frames,
            samples_per_pixel=int(first.get("SamplesPerPixel", 1) or 1),
            photometric=str(first.get("PhotometricInterpretation", "") or ""),
            has_pixels=any("PixelData" in ds or "FloatPixelData" in ds for ds in datasets),
            volumetric=volumetric,
            laterality=laterality if laterality in ("L", "R", "B") else "",
            called_ae=called_ae,
            contradiction=contradiction,
        )

    def summary(self) -> dict[str, Any]:
        out = {
            "modality": self.modality,
            "anatomy": [f"{m.region.meaning} (SCT {m.region.code}) {m.confidence:.2f} from {m.source} {m.text!r}"
                        for m in self.anatomy],
            "requested_findings": list(self.requested_findings),
            "finding_text": self.finding_text,
            "slices": self.slices,
            "photometric": self.photometric,
            "laterality": self.laterality,
            "called_ae": self.called_ae,
        }
        if self.contradiction is not None:
            out["contradiction"] = {**asdict(self.contradiction), "text": self.contradiction.describe()}
        return out


@dataclass(frozen=True)
class ScoreComponent:
    rule: str
    points: float
    reason: str


@dataclass
class Candidate:
    uid: str
    name: str
    version: str
    score: float = 0.0
    components: list[ScoreComponent] = field(default_factory=list)

    def add(self, rule: str, points: float, reason: str) -> None:
        self.components.append(ScoreComponent(rule, round(points, 3), reason))
        self.score = round(self.score + points, 3)


@dataclass(frozen=True)
class Rejection:
    uid: str
    name: str
    version: str
    reasons: tuple[str, ...]


@dataclass
class Selection:
    facts: SeriesFacts
    ranked: list[Candidate]
    rejected: list[Rejection]
    # What the contradiction (if any) did: "held" (nothing runs), "trusted image", "trusted
    # header", "marked" (runs, result marked unverified), "decided by a person" ("" without one).
    contradiction_action: str = ""

    @property
    def held(self) -> bool:
        return self.contradiction_action == "held"

    @property
    def unverified(self) -> str:
        """The text a marked result carries ("" when the result is not to be marked)."""
        c = self.facts.contradiction
        if self.contradiction_action != "marked" or c is None:
            return ""
        return f"UNVERIFIED: image and header disagree: {c.describe()}"

    @property
    def best(self) -> Candidate | None:
        """The model to run: none when nothing fits or a contradiction holds the series."""
        return self.ranked[0] if self.ranked and not self.held else None

    @property
    def suitable(self) -> bool:
        return self.best is not None

    def explain(self) -> str:
        """The ranking as text a person reads in a log or a terminal."""
        lines = []
        c = self.facts.contradiction
        if c is not None:
            lines.append(f"CONTRADICTION: {c.describe()}; policy {c.policy}: {self.contradiction_action}"
                         + (" (nothing runs until a person decides: modelnode jobs retry ID --model X "
                            "or --trust image|header)" if self.held else ""))
            if self.held:
                lines.append("would have ranked:" if self.ranked else "no model would have fitted")
        if self.ranked:
            for i, c in enumerate(self.ranked, 1):
                lines.append(f"{i}. {c.name} {c.version} ({c.uid}) score {c.score:g}")
                lines += [f"     {p.rule:<10} {p.points:+g}  {p.reason}" for p in c.components]
        elif c is None:
            lines.append("no suitable model")
        for r in self.rejected:
            lines.append(f"   rejected {r.name} {r.version} ({r.uid}): " + "; ".join(r.reasons))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "suitable": self.suitable,
            "held": self.held,
            "contradiction_action": self.contradiction_action,
            "facts": self.facts.summary(),
            "ranked": [asdict(c) for c in self.ranked],
            "rejected": [asdict(r) for r in self.rejected],
        }


# --------------------------------------------------------------------------- helpers


def version_key(version: str) -> tuple:
    """Order versions numerically where they are numbers ("1.10" > "1.9"), textually otherwise."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[.\-+_]", version))


def _words(text: str) -> set[str]:
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    return set(re.findall(r"[a-z0-9]+", text))


def _model_regions(card: ModelCard, norm: anatomy.AnatomyNormaliser) -> list[tuple[str, str]]:
    """(SNOMED code, meaning) of everything the model targets: its codes and its body-part terms."""
    out = [(c.value, c.meaning) for c in card.target.anatomy if c.scheme in ("SCT", "SRT")]
    for term in card.target.body_parts:
        region = norm.region(term)
        if region is not None:
            out.append((region.code, region.meaning))
    return list(dict.fromkeys(out))


def _rule_applies(rule: SiteRule, facts: SeriesFacts) -> bool:
    if rule.called_ae and rule.called_ae != facts.called_ae:
        return False
    return not (rule.modality and rule.modality != facts.modality)


def _names(rule: SiteRule, uid: str, name: str) -> bool:
    return uid in rule.models or name in rule.models


def _finding_matches(card_findings: Sequence[Code], facts: SeriesFacts) -> list[str]:
    """Meanings of the card's findings the request names, by code or by word."""
    words = _words(facts.finding_text)
    hits = []
    for f in card_findings:
        if f.value in facts.requested_findings:
            hits.append(f"{f.meaning} (SCT {f.value}, coded in the request)")
        elif words and (words & set(FINDING_WORDS.get(f.value, ())) or words >= _words(f.meaning)):
            hits.append(f"{f.meaning} (SCT {f.value}, from the reason for the request)")
    return hits


# --------------------------------------------------------------------------- the algorithm


def select(
    facts: SeriesFacts,
    models: Sequence[tuple[str, ModelCard]],
    settings: SelectionSection | None = None,
    *,
    normaliser: anatomy.AnatomyNormaliser | None = None,
) -> Selection:
    """Rank ``models`` (pairs of model UID and card) for ``facts``. Pure and deterministic.

    A contradiction between header and image (``facts.contradiction``) is handled by its policy:
    ``hold`` ranks on both readings for the record but :attr:`Selection.best` is None;
    ``image`` ranks on the image's reading and the header regions that agree with it;
    ``header`` and ``mark`` rank on the header's readings alone (``mark`` then marks the
    result); a person's decision (``facts.decided``) overrides the policy.
    """
    settings = settings or SelectionSection()
    norm = normaliser or anatomy.default_normaliser()
    facts, action = _apply_contradiction(facts, settings.min_anatomy)
    rules = [r for r in settings.rules if _rule_applies(r, facts)]
    routes = [r for r in rules if r.action == "route"]
    requested = bool(facts.requested_findings or facts.finding_text.strip())

    passed: list[tuple[Candidate, ModelCard]] = []
    rejected: list[Rejection] = []
    for uid, card in sorted(models, key=lambda m: m[0]):
        ident, spec = card.identity, card.input
        reasons: list[str] = []
        if any(r.action == "exclude" and _names(r, uid, ident.name) for r in rules):
            reasons.append("excluded by a site rule")
        if routes and not any(_names(r, uid, ident.name) for r in routes):
            reasons.append(f"called AE {facts.called_ae!r} routes to {sorted({m for r in routes for m in r.models})} only")
        if facts.modality not in card.target.modalities:
            reasons.append(f"modality {facts.modality or 'missing'} is not one of {'/'.join(card.target.modalities)}")
        if not facts.has_pixels:
            reasons.append("the series has no pixel data")
        if facts.samples_per_pixel != spec.channels:
            reasons.append(f"{facts.samples_per_pixel} samples per pixel, the model takes {spec.channels} channel(s)")
        if facts.photometric and facts.photometric not in spec.photometric:
            reasons.append(f"photometric {facts.photometric} is not one of {'/'.join(spec.photometric)}")
        if spec.layout == "3d" and not facts.volumetric:
            reasons.append("the model needs a 3D volume; the series has no consistent slice geometry")
        if facts.slices < spec.min_slices:
            reasons.append(f"{facts.slices} slice(s), the model needs at least {spec.min_slices}")
        lat = card.target.laterality
        if lat in ("L", "R") and facts.laterality in ("L", "R") and lat != facts.laterality:
            reasons.append(f"laterality {facts.laterality}, the model is for {lat}")

        cand = Candidate(uid, ident.name, ident.version)
        best = (0.0, 0.0, "", None)  # (weighted, similarity, relation, (match, model region))
        for m in facts.anatomy:
            for code, meaning in _model_regions(card, norm):
                sim = anatomy.similarity(m.region.code, code)
                weighted = sim * m.confidence
                if weighted > best[0]:
                    best = (weighted, sim, anatomy.relation(m.region.code, code), (m, (code, meaning)))
        weighted, sim, relation, pair = best
        if not facts.anatomy:
            reasons.append("no anatomy could be read from the headers (or the image check)")
        elif sim < settings.min_anatomy:
            seen = ", ".join(f"{m.region.meaning}" for m in facts.anatomy[:3])
            targets = ", ".join(meaning for _, meaning in _model_regions(card, norm)) or "nothing coded"
            reasons.append(f"anatomy {seen} does not match the model's {targets}")
        if reasons:
            rejected.append(Rejection(uid, ident.name, ident.version, tuple(reasons)))
            continue
        if pair is None:
            # Only with min_anatomy 0, which admits a model whose regions share nothing with the series'.
            seen = ", ".join(f"{m.region.meaning}" for m in facts.anatomy[:3])
            cand.add("anatomy", 0.0, f"unrelated: series {seen} and the model's regions have nothing in common "
                                     f"(admitted by min_anatomy {settings.min_anatomy:g})")
        else:
            m, (code, meaning) = pair
            cand.add("anatomy", ANATOMY_POINTS * weighted,
                     f"{relation}: series {m.region.meaning} (from {m.source} {m.text!r}, confidence "
                     f"{m.confidence:.2f}) vs model {meaning}, similarity {sim:.2f}")
        if requested:
            hits = _finding_matches(card.target.findings, facts)
            if hits:
                cand.add("finding", FINDING_POINTS, "the request names " + ", ".join(hits))
            else:
                cand.add("finding", 0.0, "the request names a finding this model does not target")
        else:
            cand.add("finding", 0.0, "no finding requested")
        if lat and lat == facts.laterality:
            cand.add("laterality", LATERALITY_POINTS, f"laterality {lat} matches")
        if any(r.action == "pin" and _names(r, uid, ident.name) for r in rules):
            cand.add("site pin", PIN_POINTS, "pinned by a site rule")
        passed.append((cand, card))

    _score_versions(passed)
    # Stable sorts from the least significant key: score, then name, newest version, UID.
    ranked = sorted((c for c, _ in passed), key=lambda c: c.uid)
    ranked.sort(key=lambda c: version_key(c.version), reverse=True)
    ranked.sort(key=lambda c: c.name)
    ranked.sort(key=lambda c: -c.score)
    return Selection(facts, ranked, rejected, action)


def _is_image(m: anatomy.AnatomyMatch) -> bool:
    return m.source.startswith(IMAGE_SOURCE)


def _apply_contradiction(facts: SeriesFacts, min_similarity: float) -> tuple[SeriesFacts, str]:
    """The facts the ranking uses under the contradiction's policy, and what was done."""
    c = facts.contradiction
    if c is None:
        return facts, ""
    how = facts.decided or c.policy
    if how == "model":  # a person named the model: both readings count, nothing is held or marked
        return facts, "decided by a person"
    if how == "image":
        keep = tuple(m for m in facts.anatomy
                     if _is_image(m) or anatomy.similarity(m.region.code, c.image_code) >= min_similarity)
        return replace(facts, anatomy=keep), "trusted image" + (" (decided by a person)" if facts.decided else "")
    if how in ("header", "mark"):
        keep = tuple(m for m in facts.anatomy if not _is_image(m))
        if how == "mark":
            return replace(facts, anatomy=keep), "marked"
        return replace(facts, anatomy=keep), "trusted header" + (" (decided by a person)" if facts.decided else "")
    return facts, "held"


class SelectionIndex:
    """The models grouped by target modality and by the anatomy they target, for :meth:`candidates`.

    :func:`select` looks at every model. Two of its hard constraints depend on nothing but the
    series and the model: the series' modality must be one of the model's, and the best pair of
    (series anatomy, model anatomy) must reach ``min_anatomy``; a model rejected by either takes
    no part in the ranking of the others (the version points compare passed models only). So
    :func:`select` over :meth:`candidates` ranks exactly as over every model, and
    ``tests/test_selection.py`` checks that it does. With 2,000 models of 34 modality and
    body-part kinds, a chest CT leaves about 240 candidates.
    """

    def __init__(self, models: Sequence[tuple[str, ModelCard]], normaliser: anatomy.AnatomyNormaliser) -> None:
        self.models = list(models)
        # modality -> SNOMED CT region code -> indexes into self.models
        self._by_modality: dict[str, dict[str, list[int]]] = {}
        for i, (_uid, card) in enumerate(self.models):
            codes = [code for code, _ in _model_regions(card, normaliser)]
            for modality in dict.fromkeys(card.target.modalities):
                per = self._by_modality.setdefault(modality, {})
                for code in codes:
                    per.setdefault(code, []).append(i)

    def candidates(self, facts: SeriesFacts, min_anatomy: float) -> list[tuple[str, ModelCard]]:
        """The models that may pass both constraints for ``facts`` (a superset of those that do)."""
        per = self._by_modality.get(facts.modality, {})
        if min_anatomy <= 0:
            keep = {i for idxs in per.values() for i in idxs}  # (anatomy never rejects)
            keep |= self._without_anatomy(facts.modality)
        else:
            keep = set()
            for code, idxs in per.items():
                if any(anatomy.similarity(m.region.code, code) >= min_anatomy for m in facts.anatomy):
                    keep.update(idxs)
        return [self.models[i] for i in sorted(keep)]

    def _without_anatomy(self, modality: str) -> set[int]:
        indexed = {i for idxs in self._by_modality.get(modality, {}).values() for i in idxs}
        return {i for i, (_, card) in enumerate(self.models) if modality in card.target.modalities} - indexed


def _score_versions(passed: list[tuple[Candidate, ModelCard]]) -> None:
    by_name: dict[str, list[tuple[Candidate, ModelCard]]] = {}
    for cand, card in passed:
        by_name.setdefault(cand.name, []).append((cand, card))
    for group in by_name.values():
        validated = [c for c, card in group if card.provenance.performance]
        newest_validated = max(validated, key=lambda c: version_key(c.version), default=None)
        for cand, _card in group:
            if cand is newest_validated:
                cand.add("version", VERSION_POINTS, f"newest validated version of {cand.name}")
            elif newest_validated is not None and version_key(cand.version) > version_key(newest_validated.version):
                cand.add("version", UNVALIDATED_NEWER_POINTS,
                         f"newer than {newest_validated.version} but its card reports no performance figures")
            elif newest_validated is None and cand is max((c for c, _ in group), key=lambda c: version_key(c.version)):
                cand.add("version", UNVALIDATED_NEWER_POINTS, f"newest version of {cand.name}, not validated")
            else:
                cand.add("version", 0.0, "an older version")
