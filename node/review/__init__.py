"""Radiologists' verdicts on AI results: corrections (SEG), accept and reject (KOS), per model.

``verdicts`` keeps the table and the counts; ``segs`` reads segmentations into masks and
compares them; ``intake`` links what a workstation sends back to the result and the model.
See docs/review.md.
"""
