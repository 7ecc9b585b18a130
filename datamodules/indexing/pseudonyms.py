"""Keyed-hash pseudonyms, site keys built from scanner fields, and modality codes read from headers."""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: header keywords of the site key by default.
DEFAULT_SITE_FIELDS: tuple[str, ...] = ("Manufacturer", "ManufacturerModelName", "InstitutionName", "MagneticFieldStrength")

#: DICOM PS3.15 basic-profile attributes that may be asked for as site fields: stored only as tokens.
IDENTIFYING_FIELDS: dict[str, str] = {
    "InstitutionName": "inst",
    "InstitutionAddress": "addr",
    "InstitutionalDepartmentName": "dept",
    "StationName": "station",
    "DeviceSerialNumber": "device",
    "DeviceUID": "device",
    "OperatorsName": "anon",
    "PerformingPhysicianName": "anon",
    "ReferringPhysicianName": "anon",
    "PhysiciansOfRecord": "anon",
    "RequestingPhysician": "anon",
    "ScheduledStationName": "station",
    "PerformedStationName": "station",
    "PerformedLocation": "anon",
}

_MR_WORDS = ("MRI", "MR", "T1", "T2", "FLAIR", "ADC", "DWI", "T1W", "T2W", "T1GD", "PD", "MP-MRI", "BOLD")
_KNOWN_MODALITIES = ("CT", "MR", "PT", "US", "CR", "DX", "MG", "NM", "XA", "RF", "OT")


def pseudonym(salt: str, value: str, n: int = 12) -> str:
    """First ``n`` hex digits of HMAC-SHA256(salt, value)."""
    return hmac.new(salt.encode("utf-8"), value.encode("utf-8"), hashlib.sha256).hexdigest()[:n]


_IDENTIFYING_PATTERN = re.compile(
    r"^(Patient|OtherPatient|Institution|Referring|Performing|Requesting|Operators|Physician)|(UID|Date|Time|Address|ID|Name|Names)$"
)
_SAFE_FIELDS = frozenset({"Manufacturer", "ManufacturerModelName", "MagneticFieldStrength", "Modality"})


def _is_identifying(keyword: str) -> bool:
    """Whether a header keyword may identify a person or an institution (PS3.15 basic profile, broadly)."""
    return keyword in IDENTIFYING_FIELDS or (keyword not in _SAFE_FIELDS and bool(_IDENTIFYING_PATTERN.search(keyword)))


def _format_value(value: Any) -> str | None:
    """A header value as site-key text (numbers as ``%g``, whitespace collapsed), or None when empty."""
    if value is None or isinstance(value, (dict, bool)):
        return None
    if isinstance(value, (list, tuple)):
        parts = [_format_value(v) for v in value]
        joined = "\\".join(p for p in parts if p)
        return joined or None
    if isinstance(value, (int, float, np.integer, np.floating)):
        f = float(value)
        return f"{f:g}" if np.isfinite(f) else None
    text = " ".join(str(value).split())
    if not text:
        return None
    if re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", text):
        return f"{float(text):g}"
    return text


def site_key(values: Mapping[str, Any], site_fields: Sequence[str], salt: str) -> tuple[str, dict[str, str]]:
    """Build the site key from header values.

    Identifying fields (InstitutionName, StationName, ... see `IDENTIFYING_FIELDS`) enter only as a token,
    e.g. ``"inst-3fa2c1"`` (first 6 hex digits of HMAC-SHA256(salt, value)).

    Args:
        values: header keyword -> value (DICOM header or BIDS sidecar).
        site_fields: keywords, in key order.
        salt: secret for the tokens.

    Returns:
        (key, info): key is the present values joined by ``" | "`` (``"unknown"`` when none), info the same
        values by field name.
    """
    info: dict[str, str] = {}
    for f in site_fields:
        text = _format_value(values.get(f))
        if text is None:
            continue
        if _is_identifying(f):
            text = f"{IDENTIFYING_FIELDS.get(f, 'anon')}-{pseudonym(salt, text, 6)}"
        info[f] = text
    key = " | ".join(info[f] for f in site_fields if f in info)
    return (key or "unknown"), info


def normalise_modality(value: Any) -> str | None:
    """A DICOM modality code from a header or dataset.json value ("T1w", {"0": "MRI"}, ...), or None."""
    if isinstance(value, Mapping):  # Decathlon {"0": "CT"} / nnU-Net channel_names
        items = [str(v) for v in value.values()]
        mods = {m for m in (normalise_modality(v) for v in items) if m}
        return mods.pop() if len(mods) == 1 else None
    if not isinstance(value, str) or not value.strip():
        return None
    v = value.strip().upper()
    if v in _KNOWN_MODALITIES:
        return v
    if v in _MR_WORDS or v.startswith("MR") or "MRI" in v:
        return "MR"
    return None
