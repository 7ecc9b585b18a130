"""What users run: the `imaging-meta` CLI, evaluate, compare, results, segment, classify, explanations, DICOM-SEG."""
