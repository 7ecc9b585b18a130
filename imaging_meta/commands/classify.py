"""Few-shot classification of a user's images: a checkpoint, a support folder (one subfolder per class), queries.

Every image goes through the same preprocessing as in training (size, channels and CT window, read from
the checkpoint). The queries are classified against the whole support set as the query set of one episode
(`predict_queries`): a query's prediction does not depend on which other queries are passed with it (every
learner normalises its queries with the support's statistics), so the support is encoded once for all the queries
of a pass (`queries_per_pass`: 1568 at 32 x 32).

With ``explain=True``, each query also gets, in ``<CSV stem>_explain/`` next to the CSV, a JSON file and a
PNG panel named ``<query number>_<query file stem>``: its nearest support images under the learner's own
measure (or a stated model-agnostic one) and an occlusion saliency map (`imaging_meta.commands.explain`). They hold
only the paths given, class names and numbers.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from datamodules.io.atomic import atomic_open
from datamodules.io.folders import files_under
from datamodules.io.nifti_names import is_nifti
from datamodules.messages import LISTED, first, listed
from datamodules.progress import progress
from datamodules.sources.image_folder import (
    DICOM_EXTENSIONS,
    NATIVE_RANGE,
    PIL_EXTENSIONS,
    class_folders,
    dangling_link,
    dicom_kind,
    file_digest,
    ignored_name,
    listed_file,
    maybe_dicom_name,
)
from imaging_meta.backbones import is_transductive
from imaging_meta.checkpoint_io import CheckpointError, load_learner, resolve_device
from imaging_meta.commands.outputs import check_output_file, check_outputs
from imaging_meta.episode import Episode, collate_episodes
from imaging_meta.evaluation.scoring import learner_choices
from imaging_meta.learners.base import Learner
from imaging_meta.learners.descriptors.colour import equal_channels
from imaging_meta.tasks import CLASSIFICATION, get_task

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (*PIL_EXTENSIONS, *DICOM_EXTENSIONS)
#: volume formats a user may leave in a query folder: named in the warning that skips them
_VOLUME_SUFFIXES = (".mgz", ".mgh", ".nrrd", ".nhdr", ".mha", ".mhd", ".mnc", ".hdr", ".img", ".img.gz", ".rec", ".par")
#: files operating systems write into folders (never named in a warning)
_SYSTEM_FILES = frozenset({"thumbs.db", "desktop.ini"})


def _is_dicom(path: Path) -> bool:
    return dicom_kind(path) is not None


def _image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted: image suffixes, and DICOM files named without one (no
    suffix, or a UID). As ``fit`` does, files under a hidden folder (``.thumbnails/``) or ``__MACOSX/`` (relative
    to ``folder``) and hidden files are ignored; a file named without an image suffix that is not DICOM (a README,
    a lock file), and a DICOM object that is no image (a DICOMDIR, a structure set, a report, a presentation state:
    PACS exports hold them beside the images), are skipped with a warning."""
    files, others, dangling = [], [], []
    for f in files_under(folder):
        if not listed_file(f) or any(map(ignored_name, f.relative_to(folder).parts)) or f.name.lower() in _SYSTEM_FILES:
            continue
        if not f.exists():  # a link to nothing: named before any work, never left out of the answers without a word
            dangling.append(dangling_link(f))
            continue
        maybe = maybe_dicom_name(f)
        if not maybe and f.suffix.lower() not in IMAGE_SUFFIXES:
            if is_nifti(f) or f.name.lower().endswith(_VOLUME_SUFFIXES):
                logger.warning("skipping %s: a NIfTI or other volume file; classify takes 2D images (segment takes "
                               "volumes; or export the slices you want classified as PNG or DICOM)", f)
            else:
                others.append(f)
            continue
        kind = dicom_kind(f) if maybe or f.suffix.lower() in DICOM_EXTENSIONS else "image"
        if kind == "image":
            files.append(f)
        elif kind is None and maybe:
            logger.warning("skipping %s: not DICOM, and its name has no image suffix", f)
        elif kind is None:
            files.append(f)  # named .dcm but not DICOM: read by its content (a PNG...), or the reader names the problem
        else:
            logger.warning("skipping %s: %s, not an image", f, kind)
    if dangling:
        for message in dangling[LISTED:]:
            logger.warning("%s", message)
        raise FileNotFoundError(f"{listed(dangling)}; point the link(s) at the image again, or remove them")
    if others:
        names = ", ".join(str(f.relative_to(folder)) for f in others[:5]) + (", ..." if len(others) > 5 else "")
        logger.warning("skipping %d file(s) in %s whose suffix is no image format read here (%s): %s",
                       len(others), folder, ", ".join(IMAGE_SUFFIXES), names)
    return files


def support_folder(root: str | os.PathLike) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names (sorted subfolder names) and (image, label) pairs of a support folder.

    Raises:
        ValueError: when the folder is missing, has fewer than two class subfolders, or a class has no image.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: the support must be a folder with one subfolder per class")
    classes = [d.name for d in class_folders(root, logging.INFO)]
    loose = [f for f in sorted(root.iterdir()) if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
             and not f.name.startswith(".")]
    if loose:
        logger.warning("%s: %d image(s) directly in the support folder are not used (e.g. %s): a support image goes "
                       "into the subfolder of its class", root, len(loose), loose[0].name)
    if len(classes) < 2:
        raise ValueError(f"{root}: found {len(classes)} class subfolder(s); a support set needs one subfolder per class, at least two")
    items = []
    for i, c in enumerate(classes):
        files = _image_files(root / c)
        if not files:
            raise ValueError(f"{root / c}: no PNG, JPEG, TIFF, BMP or DICOM image in this class folder")
        items += [(f, i) for f in files]
    return classes, items


def query_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files of the ``--query`` arguments: files as given, folders expanded (recursively)."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            found = _image_files(p)
            if not found:
                raise ValueError(f"{p}: no PNG, JPEG, TIFF, BMP or DICOM image in this query folder")
            out += found
        elif p.is_file():
            if p.suffix.lower() not in IMAGE_SUFFIXES and (is_nifti(p.name) or not _is_dicom(p)):  # .IMA is DICOM
                kind = (
                    "a NIfTI volume (use `imaging-meta segment` for volumes)" if is_nifti(p.name)
                    else f"a {p.suffix} file" if p.suffix else "no image suffix, and not DICOM"
                )
                raise ValueError(f"{p}: {kind}; classify reads 2D images: PNG, JPEG, TIFF, BMP or single-frame DICOM")
            out.append(p)
        else:
            raise ValueError(f"{p}: no such query file or folder")
    unique: list[Path] = []  # a file given twice (a folder and a file in it): one row, and a warning
    seen: set[Path] = set()
    twice: list[str] = []
    for q in out:
        key = q.resolve()
        if key in seen:
            twice.append(str(q))
        else:
            seen.add(key)
            unique.append(q)
    if twice:
        logger.warning("%d query file(s) given more than once, classified once: %s", len(twice),
                       first(twice, sep=", "))
    return unique


def loader_settings(extra: dict, learner) -> dict:
    """``load_image`` settings from the checkpoint's preprocessing section; three channels for a learner that
    ``reads_colour`` (descriptor and task-adaptive learners: colour is kept for their descriptors); the intensity
    scaling of the checkpoint's source (a MedMNIST checkpoint's: by the pixel type's range)."""
    pre = dict(extra.get("preprocessing") or {})
    size = pre.get("image_size") or pre.get("patch_size")
    if size is None:
        raise CheckpointError("the checkpoint has no image size in its preprocessing; it was not trained on classification data")
    if len(size) != 2:
        raise CheckpointError(
            f"the checkpoint was trained on {len(size)}D patches of size {list(size)}; classify takes 2D images "
            "(PNG, JPEG, TIFF, BMP or single-frame DICOM)"
        )
    channels = int(pre.get("channels") or learner.config["init_args"].get("in_channels", 1))
    if channels == 1 and getattr(learner, "reads_colour", False):
        # colour images stay in colour (grey ones stay grey): the descriptors describe every channel, and a
        # grey-trained embedding inside each channel as a grey image (`TaskAdaptiveClassifier.embedding_episodes`)
        channels = 3
    # a MedMNIST checkpoint saw 8-bit pixels divided by 255, not stretched over each image's own range (an
    # ImageFolder's rule): its PNG queries are read its way (a review: 3 of 9 right against about 0.9 in evaluate)
    intensity = NATIVE_RANGE if pre.get("intensity") == NATIVE_RANGE else None
    return {"image_size": [int(s) for s in size], "channels": channels, "ct_window": pre.get("ct_window", [-250.0, 250.0]),
            "intensity": intensity}


def _episode(s_images: torch.Tensor, s_labels: torch.Tensor, classes: Sequence[str], queries: torch.Tensor, index: int) -> Episode:
    """The episode of queries (Q, C, H, W), numbered from ``index``: the whole support set (S, C, H, W), labels
    (S,), and the queries (their labels unknown: zeros, never read)."""
    return Episode(
        support_images=s_images,
        support_labels=s_labels,
        query_images=queries,
        query_labels=torch.zeros(len(queries), dtype=torch.long),
        classes=list(classes),
        site="",
        support_ids=[f"support{i}" for i in range(len(s_labels))],
        query_ids=[f"query{index + j}" for j in range(len(queries))],
    )


#: an image this many times the checkpoint's size along an axis (or more) is "far larger"; one whose larger side is
#: at most this fraction of the input's is "far smaller"
FAR_LARGER = 4.0
#: aspect ratios that differ by this factor (or more) are "another aspect ratio"
OTHER_ASPECT = 1.25


def resolution_notes(shapes: dict[Path, tuple[int, int]], image_size: Sequence[int]) -> list[str]:
    """What to tell the user when images are far larger or far smaller than the checkpoint's input, or of another
    aspect ratio: classify keeps the checkpoint's preprocessing (fit inside ``image_size``, zero-pad), and says so."""
    th, tw = (int(v) for v in image_size)
    notes = []
    large = [p for p, (h, w) in shapes.items() if max(h / th, w / tw) >= FAR_LARGER]
    if large:
        h, w = max((shapes[p] for p in large), key=lambda s: s[0] * s[1])
        notes.append(
            f"{len(large)} of {len(shapes)} images are at least {FAR_LARGER:g}x the checkpoint's {th} x {tw} input "
            f"(largest {h} x {w}, e.g. {large[0]}): classify keeps the checkpoint's preprocessing and shrinks them, "
            "losing fine detail; for such images train with a larger image_size in the data config"
        )
    small = [p for p, (h, w) in shapes.items() if max(h / th, w / tw) <= 1 / FAR_LARGER]
    if small:
        h, w = min((shapes[p] for p in small), key=lambda s: s[0] * s[1])
        notes.append(
            f"{len(small)} of {len(shapes)} images are at most 1/{FAR_LARGER:g} of the checkpoint's {th} x {tw} input "
            f"(smallest {h} x {w}, e.g. {small[0]}): classify enlarges them, which adds no detail; check that they "
            "are the images you meant (not thumbnails or icons)"
        )
    target = th / tw
    other = [p for p, (h, w) in shapes.items() if max(h / w / target, target * w / h) >= OTHER_ASPECT]
    if other:
        h, w = shapes[other[0]]
        notes.append(
            f"{len(other)} of {len(shapes)} images have another aspect ratio than the checkpoint's {th} x {tw} input "
            f"(e.g. {other[0]}: {h} x {w}): they are scaled to fit and zero-padded, as in training"
        )
    return notes


def _colour(image: torch.Tensor) -> bool:
    """A (C, H, W) image whose channels differ (grey stored as RGB is grey)."""
    return image.shape[0] > 1 and not bool((image == image[:1]).all())


#: query pixels per pass of `classify` (32 queries of 224 x 224): the memory of a pass, whatever the image size
PASS_PIXELS = 32 * 224 * 224


def queries_per_pass(image_size: Sequence[int]) -> int:
    """How many queries `classify` passes with the support at once, as the query set of one episode:
    `PASS_PIXELS` worth, at least 32 (a transductive learner, one episode per query, gets 32)."""
    return max(32, PASS_PIXELS // max(1, int(image_size[0]) * int(image_size[1])))


def colour_notes(support: Sequence[Path], s_images: torch.Tensor, queries: Sequence[Path],
                 q_colour: Sequence[bool], made_grey: bool = False) -> list[str]:
    """What to tell the user when a support set mixes colour and grey images (one colour image turns the whole
    support into a colour task, see `imaging_meta.learners.descriptors.colour`; ``fit``'s image folder refuses
    the mix as nearly always a stray image), or when queries are colour and the support grey or the other way
    (``q_colour``: whether each query is in colour, `is_colour`; the queries' pixels are not kept; ``made_grey``:
    the colour queries of a grey support were read as grey pictures)."""
    notes = []
    s_colour = [_colour(x) for x in s_images]
    if any(s_colour) and not all(s_colour):
        odd = [p for p, c in zip(support, s_colour, strict=True) if c == (sum(s_colour) < len(s_colour) / 2)]
        notes.append(f"the support mixes colour and grey images ({sum(s_colour)} of {len(s_colour)} in colour; "
                     f"the fewer kind, e.g. {odd[0]}): a stray screenshot or overlay? Each query is compared in colour")
    elif q_colour:
        other = [p for p, c in zip(queries, q_colour, strict=True) if c != s_colour[0]]
        if other:
            notes.append(f"{len(other)} of {len(q_colour)} queries are {'grey' if s_colour[0] else 'colour'} and the "
                         f"support {'colour' if s_colour[0] else 'grey'} (e.g. {other[0]}): their colour cannot match"
                         + ("; they are compared in grey, their luma read as a grey picture is" if made_grey else ""))
    return notes


def with_space(learner: Learner, space: str = "auto", finetune_steps: int = 0) -> Learner:
    """The learner `classify` runs: ``auto`` wraps a learned embedding in `TaskAdaptiveClassifier` (a descriptor
    or task-adaptive learner is kept as it is); ``learned`` keeps the learner; ``finetune_steps`` > 0 wraps it in
    `SupportFineTune` instead."""
    from imaging_meta.learners.descriptors.classifier import DescriptorClassifier
    from imaging_meta.learners.descriptors.task_adaptive import TaskAdaptiveClassifier

    if space not in ("auto", "learned"):
        raise ValueError(f"space must be 'auto' or 'learned', got {space!r}")
    if finetune_steps < 0:
        raise ValueError(f"finetune_steps must be >= 0, got {finetune_steps}")
    if finetune_steps:
        from imaging_meta.learners.transfer.support_finetune import with_support_finetuning

        return with_support_finetuning(learner, finetune_steps)
    if space == "learned" or isinstance(learner, (DescriptorClassifier, TaskAdaptiveClassifier)):
        return learner
    return TaskAdaptiveClassifier(learner).to(next(iter(learner.parameters()), torch.empty(0)).device).eval()


def predict_queries(
    learner: Learner,
    s_images: torch.Tensor,
    s_labels: torch.Tensor,
    classes: Sequence[str],
    q_images: torch.Tensor,
    device: torch.device | str = "cpu",
    first_index: int = 0,
) -> tuple[torch.Tensor, list]:
    """Class probabilities (Q, n_way) of query images (Q, C, H, W) against the whole support set (what `classify`
    runs; `benchmarks.real_classification` scores the same function), and the learner's choice per query (a
    task-adaptive learner's space; None otherwise).

    A query's answer never depends on the other queries (every learner normalises its queries with the support's
    statistics: `tests/imaging_meta/test_non_transductive.py`), so the queries are the query set of one episode:
    the support is encoded, and a gradient learner adapted or a head fine-tuned, once for them all rather than
    once per query, and the answers equal those of one episode per query to rounding. A learner built with
    ``transductive`` norms (whose queries share their statistics) gets one episode per query."""
    if is_transductive(learner):
        eps = [_episode(s_images, s_labels, classes, q[None], first_index + j) for j, q in enumerate(q_images)]
        with torch.no_grad():
            probs = learner.predict(collate_episodes(eps).to(device))[:, 0].float().cpu()  # (T, n_way)
        choices = learner_choices(learner)  # a task-adaptive learner's choice per task (from the support alone)
        return probs, (choices if choices else [None] * len(eps))
    probs = torch.empty(len(q_images), len(classes))
    out: list = [None] * len(q_images)
    for idx in _grey_and_colour(q_images):  # a learner that reads colour describes a task as grey or colour
        batch = collate_episodes([_episode(s_images, s_labels, classes, q_images[idx], first_index)]).to(device)
        with torch.no_grad():
            probs[idx] = learner.predict(batch)[0].float().cpu()  # (Q, n_way)
        choices = learner_choices(learner)  # one task: the choice of the support, the same for its queries
        for j in idx.tolist():
            out[j] = dict(choices[0]) if choices else None
    return probs, out


def _grey_and_colour(q_images: torch.Tensor) -> list[torch.Tensor]:
    """The query indices in one group, or in two when grey queries (equal channels) and colour ones are mixed. The
    descriptor learners now decide grey or colour from the support alone (`imaging_meta.learners.descriptors.colour`;
    until 2026-12-06 one colour query turned its task to colour); the split still keeps a learner that reads the
    queries' channels together from mixing them."""
    if q_images.shape[1] > 1:
        grey = equal_channels(q_images, 1)
        if bool(grey.any()) and not bool(grey.all()):
            return [torch.nonzero(grey).flatten(), torch.nonzero(~grey).flatten()]
    return [torch.arange(len(q_images))]


def explain_dir(out_csv: str | os.PathLike) -> Path:
    """The folder of the explanations of ``out_csv``: ``<parent>/<CSV stem>_explain``."""
    out = Path(out_csv)
    return out.parent / f"{out.stem}_explain"


def _safe_stem(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem)[:80] or "query"


#: the files of one query's explanation: ``<number>_<stem>.json`` and ``.png``
EXPLANATION = re.compile(r"^[0-9]{4,}_.+\.(json|png)$")


def explanation_paths(folder: Path, index: int, query: Path) -> list[Path]:
    """The JSON and the PNG panel of query number ``index`` in ``folder`` (see `write_explanations`)."""
    name = f"{index:04d}_{_safe_stem(query)}"
    return [folder / f"{name}.json", folder / f"{name}.png"]


#: the names of the explanation files a run wrote, one per line, in their folder: the only files a later run removes
MANIFEST = ".imaging-meta-explanations.txt"


def _earlier_runs_files(folder: Path) -> tuple[list[Path], set[str]]:
    """The files in ``folder`` named as explanations (`EXPLANATION`), and the names of those an earlier run wrote:
    listed in its `MANIFEST`, or, in a folder without one (a run before the manifest), each JSON that is an
    explanation record (its ``query``, ``saliency`` and ``panel``) and the PNG panel it names."""
    if not folder.is_dir():
        return [], set()
    manifest = folder / MANIFEST
    named = [f for f in sorted(folder.iterdir()) if f.is_file() and EXPLANATION.match(f.name)]
    listed: set[str] = set()
    if manifest.is_file():
        try:
            listed = set(manifest.read_text(encoding="utf-8", errors="surrogateescape").splitlines())
        except OSError as e:
            logger.warning("%s cannot be read (%s): no earlier explanation is removed", manifest, e)
    else:
        for f in named:
            if f.suffix == ".json":
                try:
                    record = json.loads(f.read_text())
                except (OSError, ValueError):
                    continue
                if isinstance(record, dict) and {"query", "saliency", "panel"} <= set(record):
                    listed |= {f.name, str(record["panel"])}
    return named, listed


def check_explanation_names(folder: Path, planned: Sequence[str]) -> None:
    """Refuse to write an explanation over a file that no earlier run wrote (a user's own file named like one).

    Raises:
        ValueError: naming the first such file; nothing is removed or written.
    """
    if not (folder / MANIFEST).exists() and not any((folder / name).exists() for name in planned):
        return
    _, listed = _earlier_runs_files(folder)
    foreign = [folder / name for name in planned if (folder / name).exists() and name not in listed]
    if foreign:
        raise ValueError(f"{foreign[0]}: exists and is not an explanation that classify wrote ({len(foreign)} such "
                         "file(s)); move it, or give another --out")


def remove_old_explanations(folder: Path, planned: Sequence[str] = ()) -> list[Path]:
    """Remove the explanation files of an earlier run from ``folder`` before this run writes its own: they would
    sit beside them and look like this run's (query number 3 after a run with 2 queries).

    Only files named as explanations that an earlier run wrote go (`_earlier_runs_files`). Any other file stays;
    files named like explanations that are neither (a user's own) are kept with a warning, and one with a name this
    run's ``planned`` would write is refused before anything is removed (`check_explanation_names`; a review: it
    was written over).
    """
    check_explanation_names(folder, planned)
    named, listed = _earlier_runs_files(folder)
    removed: list[Path] = []
    for f in named:
        if f.name in listed:
            f.unlink()
            removed.append(f)
    (folder / MANIFEST).unlink(missing_ok=True)
    if removed:
        logger.info("removed %d explanation file(s) of an earlier run from %s", len(removed), folder)
    strays = [f.name for f in named if f.name not in listed]
    if strays:
        logger.warning("kept %d file(s) in %s named like explanations that classify did not write (e.g. %s); this "
                       "run's are listed in %s", len(strays), folder, strays[0], MANIFEST)
    return removed


def classify(
    checkpoint: str | os.PathLike,
    support: str | os.PathLike,
    queries: Sequence[str | os.PathLike],
    out_csv: str | os.PathLike,
    device: str = "auto",
    batch_size: int | None = None,
    explain: bool = False,
    explain_k: int = 3,
    occlusion_patch: int | None = None,
    occlusion_stride: int | None = None,
    space: str = "auto",
    finetune_steps: int = 0,
) -> Path:
    """Classify query images against a support folder and write one CSV row per query.

    Args:
        checkpoint: an ``imaging-meta fit`` checkpoint of a classification learner.
        support: folder with one subfolder per class, each holding a few images (PNG, JPEG, TIFF, BMP, DICOM).
        queries: image files and/or folders of images.
        out_csv: the CSV to write: ``path``, ``predicted_class`` and one ``p_<class>`` column per class.
        device: ``auto``, ``cpu`` or ``cuda``.
        batch_size: queries per pass (each still in its own episode: the answers do not depend on it); the
            support is encoded once a pass. None: `queries_per_pass` of the checkpoint's image size (at 32 x 32,
            1568; until 2026-12-06 32 at every size, so 1000 queries encoded the support 32 times). With
            ``explain``, also the occluded copies per forward pass (None: 32).
        explain: also write, per query, ``<number>_<stem>.json`` and ``.png`` into `explain_dir` (see
            `write_explanations`). The CSV is the same with or without.
        explain_k: nearest support images per query in the explanation.
        occlusion_patch: side of the occluding patch in pixels; None: about 1/7 of the image side
            (`imaging_meta.commands.explain.default_patch`).
        occlusion_stride: step of the patch; None: half the patch.
        space: ``auto``: the checkpoint's learner inside `TaskAdaptiveClassifier` (its embedding, raw pixels,
            intensity histograms and the gradient and orientation descriptors weighted per support set by
            leave-one-out; see `with_space`); ``learned``: the learner alone.
        finetune_steps: with N > 0, a new head fitted on the augmented support for N steps on top of the
            checkpoint's learner (`imaging_meta.learners.transfer.support_finetune`), instead of ``space``.

    Returns:
        The path of the CSV.

    Raises:
        ValueError: bad inputs or outputs (before the checkpoint is read); a support image that cannot be read;
            after the CSV is written with every readable query, the queries that cannot be read (each logged as a
            warning with its reason as it is met; the error names the first five and counts the others), so that
            a run with a few damaged files keeps the answers for the others.
    """
    from datamodules.sources.image_folder import load_image_and_shape, mixed_scaling

    if explain and explain_k < 1:
        raise ValueError(f"explain_k must be >= 1 nearest support images, got {explain_k}")
    out = check_output_file(out_csv)
    classes, items = support_folder(support)
    qs = query_files(queries)
    planned = [(out, "the predictions CSV")]
    if explain:
        planned += [(p, str(q)) for i, q in enumerate(qs) for p in explanation_paths(explain_dir(out), i, q)]
        # before any work; checked again before writing, when the unreadable queries have left the numbering
        check_explanation_names(explain_dir(out), [p.name for p, _ in planned[1:]])
    inputs = [f for f, _ in items] + qs + [Path(checkpoint)]
    check_outputs(planned, inputs)
    inside = [f for f in inputs if f.resolve().parent == explain_dir(out).resolve()] if explain else []
    if inside:
        raise ValueError(f"{inside[0]}: an input inside {explain_dir(out)}, the explanations folder that --explain "
                         "rewrites; move the inputs, or write the CSV elsewhere")
    if explain:  # its PNG panels would be read as images by the next run on the same folders
        folders = [Path(support)] + [Path(q) for q in queries if Path(q).is_dir()]
        holder = next((f for f in folders if explain_dir(out).resolve().is_relative_to(f.resolve())), None)
        if holder is not None:
            raise ValueError(f"{explain_dir(out)}: the explanations folder lies inside {holder}, an input folder, so "
                             "their PNG panels would be read as images by the next run; write the CSV elsewhere")
    # a support image copied into another class contradicts its label (fit warns about the same in its folders)
    first_class: dict[str, tuple[Path, int]] = {}
    contradicting = []
    for image_path, y in items:
        seen = first_class.setdefault(file_digest(image_path), (image_path, y))
        if seen[1] != y:
            contradicting.append(f"{seen[0]} = {image_path}")
    if contradicting:
        logger.warning("%d support image(s) are byte-for-byte copies of an image of another class (%s): a copy "
                       "contradicts its label; remove it from the wrong class", len(contradicting),
                       first(contradicting))
    # a query that is a support image: the same file, or a copy of its bytes under another name
    support_paths, support_bytes = {f.resolve() for f, _ in items}, set(first_class)
    same = sorted(q for q in qs if q.resolve() in support_paths or file_digest(q) in support_bytes)
    if same:
        logger.warning("%d quer%s also a support image, or a byte-for-byte copy of one (e.g. %s): each is compared "
                       "with itself, so its answer and probabilities say nothing about new images", len(same),
                       "y is" if len(same) == 1 else "ies are", same[0])
    dev = resolve_device(device)
    learner, extra = load_learner(checkpoint, dev)
    task = get_task(extra.get("task", learner.task))
    if task is not CLASSIFICATION:
        raise CheckpointError(f"{checkpoint}: a {task.name} checkpoint; classify needs a classification learner")
    trained = type(learner).__name__  # the checkpoint's learner, before --space or fine-tuning wraps it
    learner = with_space(learner, space, finetune_steps)
    settings = loader_settings(extra, learner)
    n_way = getattr(learner, "n_way", None)
    if n_way is not None and n_way != len(classes):
        raise ValueError(
            f"{support}: {len(classes)} classes ({', '.join(classes)}), but the checkpoint's "
            f"{trained} was meta-trained {n_way}-way and has a {n_way}-way head; give {n_way} class folders"
        )
    counts = torch.bincount(torch.tensor([y for _, y in items]), minlength=len(classes))
    if counts.min() != counts.max():
        logger.info("support classes have different numbers of images: %s", dict(zip(classes, counts.tolist(), strict=True)))
    shapes: dict[Path, tuple[int, int]] = {}
    windowed: dict[Path, bool] = {}  # through the CT window (a CT DICOM image), or by the image's own range

    grey_support = False  # set once the support is read: a grey support of a learner that reads colour
    coloured: set[Path] = set()  # the queries read in colour and compared in grey

    def load_image(path: Path) -> torch.Tensor:
        image, shapes[path], windowed[path] = load_image_and_shape(path, **settings)
        if grey_support and _colour(image):  # a colour query of a grey task: grey as a grey picture is read
            image = load_image_and_shape(path, **settings, colour_as_grey=True)[0]
            coloured.add(path)
        return image

    s_list, bad_support = [], []  # every support image must be readable: each one that is not is named
    for path, _ in items:
        try:
            s_list.append(load_image(path))
        except ValueError as e:  # DicomError and the 2D reader's errors name the file
            bad_support.append(str(e))
    if bad_support:
        for message in bad_support[LISTED:]:
            logger.warning("cannot be read: %s", message)
        raise ValueError(f"{len(bad_support)} support image(s) cannot be read (every support image must be): "
                         f"{listed(bad_support)}")
    s_images = torch.stack(s_list)
    # a colour query of a grey support is described in grey (`imaging_meta.learners.descriptors.colour`): made grey
    # at full size, before resizing, it lands on its grey copy; the learner's own conversion of the resized colour
    # image did not (resizing narrows the range it stretches; a review)
    # only for the learners that describe a grey task in grey (`reads_colour`: descriptors, task-adaptive); a network
    # that takes three channels, under --space learned or fine-tuning, gets the query as it is (a review)
    grey_support = (settings["channels"] == 3 and getattr(learner, "reads_colour", False)
                    and not any(_colour(x) for x in s_images))
    s_labels = torch.tensor([y for _, y in items], dtype=torch.long)
    rows, read = [], []
    all_probs, all_choices, q_colour = [], [], []
    unreadable: list[str] = []  # a query that cannot be read is listed, and the others are still classified
    # a transductive learner gets an episode per query, each with the whole support: 32 of those a pass, as before
    per_pass = batch_size or (32 if is_transductive(learner) else queries_per_pass(settings["image_size"]))
    for start in progress(range(0, len(qs), per_pass), "classify", unit="batch"):
        images, chunk = [], []
        for q in qs[start : start + per_pass]:
            try:
                images.append(load_image(q))
                chunk.append(q)
            except ValueError as e:  # DicomError and the 2D reader's errors name the file
                unreadable.append(str(e))
        if not chunk:
            continue
        q_colour += [q in coloured or _colour(x) for q, x in zip(chunk, images, strict=True)]  # not the pixels
        probs, choices = predict_queries(learner, s_images, s_labels, classes, torch.stack(images), dev, start)
        all_choices += choices
        if not torch.isfinite(probs).all():
            raise FloatingPointError(f"non-finite class probabilities for queries {[str(q) for q in chunk]}")
        all_probs += list(probs)
        read += chunk
        for q, p in zip(chunk, probs, strict=True):
            rows.append([str(q), classes[int(p.argmax())], *[f"{float(v):.6f}" for v in p]])
    for message in unreadable[LISTED:]:  # each one named once: the first few in the error, these here
        logger.warning("cannot be read: %s", message)
    fit = (getattr(learner, "last_fit", None) or [None])[0]  # fine-tuning on the support: the same fit each batch
    if fit is not None:
        from imaging_meta.learners.transfer.support_finetune import fit_summary

        logger.info("fine-tuned on the support: %s", fit_summary([fit]).removeprefix("task 0: "))
    if not rows:
        raise ValueError(f"none of the {len(qs)} queries can be read: {listed(unreadable)}")
    pictures = [p for p, w in windowed.items() if not w]
    if pictures and (extra.get("preprocessing") or {}).get("format") == "lesion_csv":
        # patches cut from volumes saw HU through the CT window or MR between percentiles; a picture is read by
        # its own range (a DICOM CT image through the window): an export of the same patch gets other values.
        # Said only when a picture was read so: CT DICOM images alone get the training values (a review)
        logger.warning("the checkpoint was trained on lesion patches cut from volumes (CT window %s HU, MR "
                       "percentiles %s); %d of the images (e.g. %s) are pictures, read stretched over their own "
                       "range, so an exported patch does not get the values it had in training: give single-frame "
                       "CT DICOM images where you can", extra["preprocessing"].get("ct_window"),
                       extra["preprocessing"].get("mr_percentiles"), len(pictures), pictures[0])
    kinds = {w: p for p, w in windowed.items()}
    if len(kinds) > 1:  # support and queries scaled two ways: the same picture as DICOM and PNG gets other answers
        logger.warning(mixed_scaling("classify", str(kinds[True]), str(kinds[False])))
    for note in resolution_notes(shapes, settings["image_size"]) + colour_notes(
            [f for f, _ in items], s_images, read, q_colour, made_grey=bool(coloured)):
        logger.warning(note)
    # surrogateescape: a file name that is not valid UTF-8 is written back as the bytes it has on disk
    with atomic_open(out, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        w = csv.writer(f)
        w.writerow(["path", "predicted_class", *[f"p_{c}" for c in classes]])
        w.writerows(rows)
    if explain:
        remove_old_explanations(explain_dir(out), [p.name for i, q in enumerate(read)
                                                   for p in explanation_paths(explain_dir(out), i, q)])
        write_explanations(
            learner, s_images, s_labels, [f for f, _ in items], classes, read, all_probs, explain_dir(out),
            load_image, dev, k=explain_k, patch_size=occlusion_patch, stride=occlusion_stride,
            batch_size=max(2, batch_size or 32), choices=all_choices, fine_tuning=fit,
        )
    if unreadable:
        raise ValueError(
            f"{len(unreadable)} of {len(qs)} queries cannot be read, and are not in {out}, which holds the other "
            f"{len(rows)}: {listed(unreadable)}"
        )
    return out


def write_explanations(
    learner: Learner,
    s_images: torch.Tensor,
    s_labels: torch.Tensor,
    s_paths: Sequence[Path],
    classes: Sequence[str],
    queries: Sequence[Path],
    probabilities: Sequence[torch.Tensor],
    folder: Path,
    load: Callable[[Path], torch.Tensor],
    device: torch.device,
    k: int = 3,
    patch_size: int | None = None,
    stride: int | None = None,
    batch_size: int = 32,
    choices: Sequence[dict | None] | None = None,
    fine_tuning: dict | None = None,
) -> list[Path]:
    """Write each query's explanation: ``<number>_<stem>.json`` and ``<number>_<stem>.png`` in ``folder``, listed
    in its `MANIFEST` (what the next run's `remove_old_explanations` may remove).

    With ``choices`` (a task-adaptive learner's choice for each query's task: the feature space and the
    leave-one-out accuracies over the support that chose it), the JSON also holds it as ``task_choice``; with
    ``fine_tuning`` (`SupportFineTune`'s record of its fit on the support: steps, body, the support losses and
    its accuracy before and after), as ``fine_tuning``.

    The JSON holds the query path, the predicted class and the class probabilities (those of the CSV), the
    ``k`` nearest support images (path, class, rank, distance or weight) with the measure's name and
    description, and the occlusion settings and range of the saliency map. The PNG shows the query, its
    nearest support images (class and distance or weight in the titles) and the saliency over the query.

    Args:
        learner: the classification learner (eval mode, on ``device``).
        s_images: (S, C, H, W) preprocessed support images.
        s_labels: (S,) their class indices.
        s_paths: the S support files, as found under the support folder.
        classes: class names; ``classes[i]`` is label ``i``.
        queries: the query files, in CSV order.
        probabilities: (n_way,) class probabilities of each query, as written in the CSV.
        folder: where to write (created).
        load: reads and preprocesses a query file into (C, H, W).
        device: the learner's device.
        k: nearest support images per query.
        patch_size: occlusion patch (None: `imaging_meta.commands.explain.default_patch`).
        stride: occlusion stride (None: half the patch).
        batch_size: occluded copies per ``predict`` call.

    Returns:
        The JSON paths written, one per query.
    """
    from imaging_meta.commands.explain import (
        FLAT_DROP,
        nearest_supports,
        occlusion_saliency,
        save_explanation_panel,
    )

    folder.mkdir(parents=True, exist_ok=True)
    # listed before they are written, so that a run stopped half-way is cleaned up by the next one
    names = [p.name for i, q in enumerate(queries) for p in explanation_paths(folder, i, q)]
    with atomic_open(folder / MANIFEST, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write("".join(f"{n}\n" for n in names))
    written = []
    steps = enumerate(zip(queries, probabilities, strict=True))
    for i, (q, probs) in progress(steps, "classify: explanations", total=len(queries), unit="query"):
        image = load(q)
        ep = _episode(s_images, s_labels, classes, image[None], i).to(device)
        near = nearest_supports(learner, ep, k)
        occ = occlusion_saliency(learner, ep, target=int(probs.argmax()), patch_size=patch_size, stride=stride,
                                 batch_size=batch_size)
        predicted = classes[int(probs.argmax())]
        idx, vals = near.indices[0].tolist(), near.values[0].tolist()
        sal = occ.saliency.float().cpu()
        json_path, png_path = explanation_paths(folder, i, q)
        record = {
            "query": str(q),
            "predicted_class": predicted,
            **({"task_choice": choices[i]} if choices and choices[i] else {}),
            **({"fine_tuning": fine_tuning} if fine_tuning else {}),
            "probabilities": {c: round(float(p), 6) for c, p in zip(classes, probs, strict=True)},
            "nearest_supports": {
                "measure": near.measure,
                "description": near.description,
                "value": near.value_name,
                "nearer_is": "larger" if near.larger_is_nearer else "smaller",
                "items": [
                    {"rank": r + 1, "path": str(s_paths[j]), "class": classes[int(s_labels[j])], near.value_name: round(v, 6)}
                    for r, (j, v) in enumerate(zip(idx, vals, strict=True))
                ],
            },
            "saliency": {
                "method": "occlusion",
                "explained_class": classes[occ.target],
                "probability_unoccluded": round(float(occ.probabilities[occ.target]), 6),
                "patch_size": occ.patch_size,
                "stride": occ.stride,
                "fill": "query mean intensity" if occ.fill == "mean" else occ.fill,
                "n_occlusions": occ.n_occlusions,
                "max_drop": round(float(sal.max()), 6),
                "min_drop": round(float(sal.min()), 6),
                "meaning": f"mean drop of p({classes[occ.target]}) when a patch covering the pixel is replaced by the fill",
                "flat": occ.flat,
                **({"note": f"no patch moves p({classes[occ.target]}) by {FLAT_DROP:g} or more"
                            + (" (the probability is saturated at 1.000)" if occ.saturated else "")
                            + ": the map says nothing about which pixels matter; the nearest supports still do"}
                   if occ.flat else {}),
            },
            "panel": png_path.name,
        }
        short = {"distance": "d", "similarity": "sim", "weight": "w"}[near.value_name]
        save_explanation_panel(
            png_path,
            image,
            s_images[idx],
            [f"#{r + 1} {classes[int(s_labels[j])]}\n{short}={v:.3g}" for r, (j, v) in enumerate(zip(idx, vals, strict=True))],
            sal,
            query_title=f"query\n{predicted} (p={float(probs.max()):.2f})",
            saliency_title=f"occlusion: drop in p({predicted})" if not occ.flat
            else f"occlusion: no patch moves\np({predicted})" + (" (saturated)" if occ.saturated else ""),
        )
        json_path.write_text(json.dumps(record, indent=2) + "\n")
        written.append(json_path)
    return written
