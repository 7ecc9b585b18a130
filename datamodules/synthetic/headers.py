"""Scanner headers of the demo files: DICOM headers with distinctive fake PHI, and BIDS JSON sidecars."""

from __future__ import annotations

from typing import Any

from datamodules.synthetic.phantom import Patient
from datamodules.synthetic.sites import Site


def _fake_identity(site_index: int, site: Site, i: int) -> dict[str, str]:
    """Distinctive fake PHI for the DICOM headers (privacy tests look for these strings)."""
    tag = f"{site.letter}{i:02d}"
    year = 1940 + (7 * i + 13 * site_index) % 45
    return {
        "PatientName": f"DEMO^PATIENT^{tag}",
        "PatientID": f"MRN-{tag}-{4711 + 97 * i + 1009 * site_index}",
        "PatientBirthDate": f"{year:04d}{1 + i % 12:02d}{1 + (3 * i) % 28:02d}",
        "AccessionNumber": f"ACC{tag}{3000 + 17 * i}",
    }


def dicom_header(site_index: int, site: Site, i: int, pat: Patient) -> dict[str, Any]:
    """The DICOM header of a CT site's patient ``i``: fake identity, scanner, study and acquisition fields.

    Args:
        site_index: index into `SITES`.
        site: the site.
        i: 1-based patient number within the site.
        pat: the patient (for PatientSex).

    Returns:
        DICOM keyword -> value, for `write_dicom_series`.
    """
    header = {
        **_fake_identity(site_index, site, i),
        "PatientSex": pat.sex,
        "Manufacturer": site.manufacturer,
        "ManufacturerModelName": site.model,
        "InstitutionName": site.institution,
        "StationName": f"{site.letter}CT01",
        "StudyDate": f"2023{1 + (i + 3 * site_index) % 12:02d}{1 + (5 * i) % 28:02d}",
        "StudyTime": f"{8 + i % 9:02d}3000",
        "StudyDescription": "CT ABDOMEN",
        "SeriesDescription": "Abdomen PV 4.0 B30f" if site.letter == "A" else "ART 5mm STND",
        "SeriesNumber": 2 if site.letter == "A" else 3,
        "BodyPartExamined": "ABDOMEN",
        "PatientPosition": "FFS",
        "KVP": "120",
        "ConvolutionKernel": "B30f" if site.letter == "A" else "STANDARD",
        "WindowCenter": "40",
        "WindowWidth": "400",
    }
    return header


def sidecar(site: Site) -> dict[str, Any]:
    """BIDS-style JSON sidecar: scanner fields only, no patient identifiers."""
    common = {
        "Modality": "MR",
        "Manufacturer": site.manufacturer,
        "ManufacturerModelName": site.model,
        "MagneticFieldStrength": site.field_strength,
        "InstitutionName": site.institution,
    }
    if site.letter == "C":
        return {**common, "SeriesDescription": "T1 mDIXON W abdomen", "MRAcquisitionType": "3D",
                "RepetitionTime": 0.0045, "EchoTime": 0.0022, "FlipAngle": 10}
    return {**common, "SeriesDescription": "t2_haste_tra", "MRAcquisitionType": "2D",
            "RepetitionTime": 1.4, "EchoTime": 0.092, "FlipAngle": 150}

