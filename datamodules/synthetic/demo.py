"""A deterministic synthetic multi-site abdominal cohort that exercises the real readers.

`generate_demo_cohort` writes four "scanner sites" with the formats and the problems of real data:

==================  =========================================  =====================  ===========  =========
site (folder)       format, vendor / model                        matrix @ in-plane      slices       voxel axes
==================  ============================================= =====================  ===========  =========
A ct_northfield     CT DICOM, SIEMENS SOMATOM Definition AS        96 x 96 @ 3.6 mm      64 @ 4.0 mm  L, P, S
B ct_harbor         CT DICOM, GE MEDICAL SYSTEMS LightSpeed VCT    80 x 80 @ 4.4 mm      52 @ 5.0 mm  L, P, S
C mr_bids           MR BIDS NIfTI (T1w), Philips Ingenia 1.5 T     72 x 72 @ 4.8 mm      58 @ 4.5 mm  R, A, S
D mr_decathlon      MR MSD NIfTI (T2w), SIEMENS MAGNETOM Skyra 3 T 64 x 64 @ 5.2 mm      44 @ 6.0 mm  L, P, S
==================  ============================================= =====================  ===========  =========

Site A stores uint16 with slope 1, intercept -1024 and natural slice order (IM_0001.dcm ...). Site B stores
int16 with slope 0.5, intercept 0, InstanceNumber 1 at the most superior slice (reversed) and random hex file
names. Site C is int16 NIfTI, site D float32 NIfTI with an LPS-oriented affine. Label maps (uint8,
`ORGANS` values) share the image's voxel grid and affine; for DICOM that is the grid a reader gets by sorting
the slices by position along the slice normal.

The anatomy is an analytic phantom defined in patient coordinates (mm, RAS+) and sampled directly on
each site's voxel grid, so image and label map share one physical grid and nothing is resampled.
Every patient gets its own body size, organ sizes, positions and rotations, table position, and a
smooth random elastic displacement applied to every structure.

Lesions: every patient gets focal lesions in the liver, spleen and kidneys (`LESION_TYPES`: 18 classes such
as cyst, haemangioma, metastasis, hepatocellular carcinoma, focal nodular hyperplasia, angiomyolipoma,
infarct). A class is a geometry (round, lobulated, irregular, spiculated or wedge-shaped; sharp or
ill-defined margin; homogeneous, rim, peripheral nodules, central scar, mosaic or layered inside) and
physical tissue properties (unenhanced HU, arterial and portal-venous enhancement, relative T1 and T2
signal) that each site renders through its own intensity model: site A is a portal-venous CT, site B a
noisier late-arterial CT, site C T1-weighted and site D T2-weighted MR, so a lesion class looks different at
every site. Class frequencies are unbalanced (cysts in every patient, some classes in one patient of six);
`draw_lesion_classes` guarantees that 12 patients per site give every class at least 14 lesions in at least
8 patients. Lesions are 6-40 mm across, do not overlap, lie inside their organ (they keep the organ's label
in the label maps) and are listed in ``lesions.csv`` at the cohort root, in the lesion-CSV input format of
`datamodules.sources.lesion_csv` (image, class, world centre x/y/z in DICOM LPS mm, size_mm, plus the host organ).

Coordinates: NIfTI world coordinates are RAS+ (nibabel "Coordinate systems and affines"): x increases
towards the subject's Right, y towards Anterior, z towards Superior. The liver, on the patient's right,
therefore has x > 0 here; the spleen, on the left, has x < 0. DICOM patient coordinates are LPS+ (x to the
Left, y to Posterior), i.e. the RAS vector with its first two components negated.

Every file is byte-identical for a given seed: random numbers come from per-site, per-patient seed
sequences, DICOM UIDs are derived from those generators, header dates are fixed and gzip streams are
written with ``mtime=0`` and no file name.

The code is split by job; this module gathers the public names:

=========================================  ==========================================================
`datamodules.synthetic.phantom`            the analytic anatomy (`ORGANS`, tissue codes, ``Patient``)
`datamodules.synthetic.sites`              the four sites (`SITES`) and their voxel grids
`datamodules.synthetic.lesion_types`       the lesion classes (`LESION_TYPES`, `draw_lesion_classes`)
`datamodules.synthetic.lesions`            lesion placement, painting and ``lesions.csv`` rows
`datamodules.synthetic.intensities`        site intensity models: texture, blur, bias field, noise
`datamodules.synthetic.headers`            DICOM headers with fake PHI, BIDS sidecars
`datamodules.synthetic.dicom_writer`       `write_dicom_series`
`datamodules.synthetic.nifti_writer`       `write_nifti`
`datamodules.synthetic.cohort`             `generate_demo_cohort`, `demo_is_complete`, `demo_settings`, the marker file
=========================================  ==========================================================
"""

from datamodules.synthetic.cohort import (
    DEMO_VERSION,
    MARKER,
    demo_is_complete,
    demo_settings,
    generate_demo_cohort,
)
from datamodules.synthetic.dicom_writer import CT_IMAGE_STORAGE, MR_IMAGE_STORAGE, write_dicom_series
from datamodules.synthetic.lesion_types import LESION_COLUMNS, LESION_TYPES, LesionType, draw_lesion_classes
from datamodules.synthetic.nifti_writer import write_nifti
from datamodules.synthetic.phantom import ORGANS
from datamodules.synthetic.sites import SITES

__all__ = [
    "CT_IMAGE_STORAGE",
    "DEMO_VERSION",
    "LESION_COLUMNS",
    "LESION_TYPES",
    "MARKER",
    "MR_IMAGE_STORAGE",
    "ORGANS",
    "SITES",
    "LesionType",
    "demo_is_complete",
    "demo_settings",
    "draw_lesion_classes",
    "generate_demo_cohort",
    "write_dicom_series",
    "write_nifti",
]
