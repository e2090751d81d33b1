"""The image-based anatomy check: a body-part classifier as a second opinion on the headers.

Radiograph headers are the messiest (empty BodyPartExamined, a default "CHEST" on every
exposure, a language nobody put in a table). When a registered classification model targets the
series' modality and its classes are anatomical structures (SNOMED category 91723000), it is run
on the images and its most probable class becomes one more anatomy reading for the selection,
with confidence ``IMAGE_WEIGHT x probability``: a confident image (p > 0.95) outweighs a
BodyPartExamined value (0.9), a hesitant one does not. Every class's probability is kept too
(:class:`~node.pipeline.selection.ImageReading`): the probability of the region the *header*
claims is what decides whether image and header contradict each other.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from pydicom.dataset import Dataset

from iods.anatomy import IMAGE_SOURCE, AnatomyMatch, AnatomyNormaliser, ImageReading
from iods.card import ModelCard
from models.infer import predict_classification
from models.runtime import LoadedModel

log = logging.getLogger(__name__)

ANATOMICAL_STRUCTURE = "91723000"
IMAGE_WEIGHT = 0.95
# Projection images: where headers are least reliable and a 2D classifier applies.
CHECKED_MODALITIES = {"CR", "DX", "RG", "PX"}


def is_body_part_classifier(card: ModelCard) -> bool:
    return card.task.type == "classification" and all(
        c.category.value == ANATOMICAL_STRUCTURE for c in card.task.classes)


def image_readings(
    datasets: Sequence[Dataset],
    models: Sequence[tuple[str, ModelCard]],
    load: Callable[[str], LoadedModel],
    normaliser: AnatomyNormaliser,
) -> list[ImageReading]:
    """Every applicable classifier's probabilities for the images of one series (empty when
    none applies). The selection reads the header's region against them
    (:func:`node.pipeline.selection.find_contradiction`)."""
    if not datasets:
        return []
    modality = str(datasets[0].get("Modality", ""))
    if modality not in CHECKED_MODALITIES:
        return []
    out: list[ImageReading] = []
    for uid, card in sorted(models, key=lambda m: m[0]):
        if not is_body_part_classifier(card) or modality not in card.target.modalities:
            continue
        try:
            probs = predict_classification(datasets, card, load(uid))
        except Exception as exc:  # an undecodable image must not stop the header-based selection
            log.warning("image check with %s skipped: %s", card.identity.name, exc)
            continue
        classes = []
        for cls, p in zip(card.task.classes, probs, strict=False):
            region = normaliser.region(cls.type.value)
            if region is not None:
                classes.append((cls.label, region, round(float(p), 4)))
        if not classes:
            continue
        reading = ImageReading(card.identity.name, tuple(classes))
        out.append(reading)
        log.info("image check (%s): %s", card.identity.name,
                 ", ".join(f"{label} {p:.2f}" for label, _, p in sorted(classes, key=lambda c: -c[2])))
    return out


def as_anatomy(readings: Sequence[ImageReading]) -> list[AnatomyMatch]:
    """Each reading's most probable class as one more anatomy reading for the ranking, with
    confidence ``IMAGE_WEIGHT x probability``."""
    out = []
    for reading in readings:
        label, region, p = reading.best()
        out.append(AnatomyMatch(region=region, confidence=round(IMAGE_WEIGHT * p, 3),
                                source=f"{IMAGE_SOURCE} ({reading.classifier})", text=label, laterality=""))
    return out


def image_anatomy(
    datasets: Sequence[Dataset],
    models: Sequence[tuple[str, ModelCard]],
    load: Callable[[str], LoadedModel],
    normaliser: AnatomyNormaliser,
) -> list[AnatomyMatch]:
    """Anatomy readings from the images of one series (empty when no classifier applies)."""
    return as_anatomy(image_readings(datasets, models, load, normaliser))
