"""Query/Retrieve levels and their unique keys (PS3.4 C.3), for the SCP and the SCU alike."""

from __future__ import annotations

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")

# Unique key of each level: what C-MOVE / C-GET must name.
UNIQUE_KEYS = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}
