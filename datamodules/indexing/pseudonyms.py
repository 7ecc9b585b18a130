"""Keyed-hash pseudonyms, site keys built from scanner fields, and modality codes read from headers."""

from __future__ import annotations

import difflib
import hashlib
import hmac
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pydicom.datadict import keyword_dict

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
    "AccessionNumber": "anon",
}

_MR_WORDS = ("MRI", "MR", "T1", "T2", "FLAIR", "ADC", "DWI", "T1W", "T2W", "T1GD", "PD", "MP-MRI", "BOLD")
_KNOWN_MODALITIES = ("CT", "MR", "PT", "US", "CR", "DX", "MG", "NM", "XA", "RF", "OT")


#: the salt when neither the config nor ``IMAGING_META_SALT`` gives one (public: the scan warns about its tokens)
DEFAULT_SALT = "imaging-meta"
#: the salts the project ships (the default and the folder configs' placeholder): public, so a token made with one
#: can be tested against a guessed name
SHIPPED_SALTS = (DEFAULT_SALT, "change-me")


def salt_or_env(salt: str | None) -> str:
    """The salt a datamodule or item source uses, and `evaluate` with a run's ``config.yaml``: ``salt`` when the
    config gives one of its own, else the environment's ``IMAGING_META_SALT`` (so that the secret need not be
    written into a config, which every run copies into its shared run folder; a review), else the config's
    shipped placeholder or `DEFAULT_SALT`. A placeholder left in a config yields to the environment, so that a user
    who exports the secret but keeps the folder config's ``salt: change-me`` gets the secret at fit and evaluate."""
    if salt is not None and salt not in SHIPPED_SALTS:
        return salt
    return os.environ.get("IMAGING_META_SALT") or (salt if salt is not None else DEFAULT_SALT)


def configured_salt(config) -> str | None:
    """The salt a run's config gives its data (``data.init_args.salt``, or its item source's), else None: ``config``
    as LightningCLI parsed it (a Namespace) or as YAML read it (a dict)."""
    try:
        init = config["data"]["init_args"]
        source = init.get("source")
        found = init.get("salt") or (source["init_args"].get("salt") if source is not None else None)
    except (KeyError, TypeError, AttributeError):
        return None
    return found if isinstance(found, str) and found else None


def pseudonym(salt: str, value: str, n: int = 12) -> str:
    """First ``n`` hex digits of HMAC-SHA256(salt, value)."""
    return hmac.new(salt.encode("utf-8"), value.encode("utf-8"), hashlib.sha256).hexdigest()[:n]


#: free-text descriptions and comments (basic profile: removed or cleaned) and accession numbers are tokens too (a
#: review: ``--site-fields AccessionNumber`` stored the numbers in plain text)
_IDENTIFYING_PATTERN = re.compile(
    r"^(Patient|OtherPatient|Institution|Referring|Performing|Requesting|Operators|Physician|Accession)|"
    r"(UID|Date|Time|Address|ID|Name|Names|Description|Comments)$"
)
_SAFE_FIELDS = frozenset({"Manufacturer", "ManufacturerModelName", "ManufacturersModelName", "MagneticFieldStrength",
                          "Modality"})
#: a BIDS sidecar's spelling of a DICOM keyword (dcm2niix writes ``ManufacturersModelName``): a site field is read
#: under either name, so one scanner's DICOM series and its converted NIfTI files share a site key (a review: the
#: model was never read from a sidecar, and a held-out scanner's NIfTI scans trained under another key)
BIDS_SPELLINGS = {"ManufacturerModelName": "ManufacturersModelName"}
#: changes whenever `site_key` gives other keys for the same headers, so that cached folder indexes are rebuilt
#: (2: BIDS spellings, field strength in tesla, case variants merged; 3: identifying values tokenised in lower
#: case; 4: accession numbers, descriptions and comments tokenised; all 2026-12-07)
SITE_KEY_VERSION = 4


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


def _field_strength(value: Any) -> str | None:
    """MagneticFieldStrength in tesla as site-key text: ``"3T"`` or ``"1.5 T"`` read as the number, and a value
    above 100, which no scanner reaches in tesla, read as gauss (older GE headers write 15000 for 1.5 T): one
    scanner, one key (a review found 15000 and 1.5 as two sites)."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*(?:t|tesla)?\s*", value, flags=re.IGNORECASE)
        value = float(m.group(1)) if m else value
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        f = float(value)
        if np.isfinite(f) and f > 100:
            value = f / 10000.0
    return _format_value(value)


def merge_case_variants(keys: Sequence[str]) -> dict[str, str]:
    """Site keys that differ only in letter case -> one of them (the most common, then the first in sorted order):
    a DICOM header's ``SIEMENS`` and a dcm2niix sidecar's ``Siemens`` are one scanner. Keys without such a variant
    map to themselves, so an index without variants keeps its keys."""
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(k.casefold(), []).append(k)
    out: dict[str, str] = {}
    for found in groups.values():
        counts = Counter(found)
        chosen = min(counts, key=lambda k: (-counts[k], k))  # the most common, then the first in sorted order
        out.update({k: chosen for k in counts})
    return out


def unknown_site_fields(site_fields: Sequence[str]) -> list[str]:
    """The site fields that are not DICOM keywords, each with the nearest keyword as a hint: a misspelt field is
    read from no header, and its cases silently lose that part of their site key (every case in site ``unknown``
    when all are misspelt; a review).

    A BIDS-only sidecar field (e.g. ``PulseSequenceType``, or the sidecar spelling ``ManufacturersModelName``,
    which the DICOM keyword ``ManufacturerModelName`` reads from sidecars too) is named as well: it is read from
    sidecars only.
    """
    out = []
    for f in site_fields:
        if f not in keyword_dict:
            near = difflib.get_close_matches(f, list(keyword_dict), n=1, cutoff=0.8)
            out.append(f"{f!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
    return out


def warn_unknown_site_fields(site_fields: Sequence[str], log: Any) -> None:
    """Log a warning on ``log`` naming the `unknown_site_fields` of ``site_fields``, if any."""
    unknown = unknown_site_fields(site_fields)
    if unknown:
        many = len(unknown) > 1
        log.warning("site field%s %s %s: read from no DICOM header, only from BIDS sidecars that carry %s under that "
                    "name (site_fields in the data config; imaging-meta scan: --site-fields)",
                    "s" if many else "", ", ".join(unknown), "are not DICOM keywords" if many else "is not a DICOM keyword",
                    "them" if many else "it")


def site_key(values: Mapping[str, Any], site_fields: Sequence[str], salt: str) -> tuple[str, dict[str, str]]:
    """Build the site key from header values.

    Identifying fields (InstitutionName, StationName, ... see `IDENTIFYING_FIELDS`) enter only as a token,
    e.g. ``"inst-3fa2c1"`` (first 6 hex digits of HMAC-SHA256(salt, value in lower case)): names that differ only
    in case are one token, as site keys that differ only in case are one site (`merge_case_variants`, which cannot
    join two tokens: "Saint X" and "SAINT X" were two sites; a review).

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
        value = values.get(f)
        if value is None and f in BIDS_SPELLINGS:
            value = values.get(BIDS_SPELLINGS[f])
        text = _field_strength(value) if f == "MagneticFieldStrength" else _format_value(value)
        if text is None:
            continue
        if _is_identifying(f):
            text = f"{IDENTIFYING_FIELDS.get(f, 'anon')}-{pseudonym(salt, text.casefold(), 6)}"
        info[f] = text
    key = " | ".join(info[f] for f in site_fields if f in info)
    return (key or "unknown"), info


def unsaid_modality(count: int, example: str, where: str, setting: str) -> str:
    """The warning for ``count`` volumes (e.g. ``example``, under ``where``) whose files do not say their modality,
    which are scaled by percentiles as MR is: ``setting`` is the config key that says CT (the segmentation data's
    and the lesion table's say it alike)."""
    return (f"{count} volume(s) under {where} do not say their modality (e.g. {example}: no DICOM header, BIDS sidecar "
            f"'Modality', Decathlon modality or air at -1000 HU), so they are scaled by percentiles as MR is; if they "
            f"are CT, set {setting}: CT (the HU window), or add a sidecar <name>.json with {{\"Modality\": \"CT\"}}")


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
