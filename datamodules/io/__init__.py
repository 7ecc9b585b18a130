"""File formats: DICOM series reading and checking, 2D pictures, NIfTI names, and atomic file writes."""
