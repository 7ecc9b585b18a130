"""Synthetic data: the deterministic multi-site demo cohort and the DICOM/NIfTI writers it uses."""
