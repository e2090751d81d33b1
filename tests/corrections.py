"""Corrections as a workstation sends them: a MANUAL SEG of the phantom truth on the source images.

``correction_seg(ai_seg, sources, masks)`` copies the AI result's segment types (what a
workstation that edits a result keeps) and draws ``masks`` ([slices, rows, cols, classes] in
the order of ``sources``) as SegmentAlgorithmType MANUAL.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset


def correction_seg(ai_seg: Dataset, sources: list[Dataset], masks: np.ndarray, *, series_number: int = 701,
                   sop_uid: str | None = None) -> hd.seg.Segmentation:
    descriptions = []
    for item in ai_seg.SegmentSequence:
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=int(item.SegmentNumber),
            segment_label=str(item.SegmentLabel),
            segmented_property_category=hd.sr.CodedConcept.from_dataset(item.SegmentedPropertyCategoryCodeSequence[0]),
            segmented_property_type=hd.sr.CodedConcept.from_dataset(item.SegmentedPropertyTypeCodeSequence[0]),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        ))
    return hd.seg.Segmentation(
        source_images=sources, pixel_array=masks.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=series_number, sop_instance_uid=sop_uid or hd.UID(),
        instance_number=1, manufacturer="reading room", manufacturer_model_name="workstation",
        software_versions="1", device_serial_number="1", omit_empty_frames=True,
    )


def truth_masks(truth, sources: list[Dataset]) -> np.ndarray:
    """[slices, rows, cols, 2] (lung, nodule) in the order of ``sources``."""
    where = {uid: k for k, uid in enumerate(truth.sop_instance_uids)}
    order = [where[str(ds.SOPInstanceUID)] for ds in sources]
    return np.stack([truth.lung[order], truth.nodule[order]], axis=-1)
