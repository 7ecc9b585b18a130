"""File formats: DICOM series reading and checking, NIfTI names, and atomic file writes."""
