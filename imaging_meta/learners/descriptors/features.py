"""Fixed image descriptors, and the per-task normalisation the descriptor learners share.

Every descriptor maps items (N, C, *spatial) with intensities in [0, 1] to vectors (N, D); it has no parameter
to learn, describes each item on its own (an item's vector never depends on the others of the batch), and is
deterministic (the histograms count with ``torch.bincount`` without weights: exact integer counts on any device).

Colour: ``pixels``, ``histogram``, ``gradient`` and ``orientation`` describe every channel (a stain, a
dermoscopic colour, is often what tells classes apart); ``radiomics`` describes the mean of the channels. Grey images stored as three
equal channels are described as grey (`imaging_meta.learners.descriptors.colour.shared_channels`), so a grey set
gives the same vectors however it was loaded.

* ``pixels``: each channel resized to ``size`` per spatial axis with area interpolation (the mean of the
  pixels each output pixel covers; pixels are repeated when the image is smaller), flattened and concatenated,
  centred on its own mean and scaled to unit norm (a constant image, norm below `FLAT`, gives the zero vector).
  32 x 32 = 1024 values per channel in 2D.
* ``histogram``: per channel, the fraction of the pixels in each of ``bins`` equal bins over [0, 1] (values
  outside are clamped into the end bins), concatenated and divided by the number of channels; sums to 1.
* ``gradient``: per channel, the histogram of the gradient magnitude, central differences along every spatial
  axis (``torch.gradient``), binned over [0, `GRADIENT_RANGE`] (larger magnitudes fall into the last bin),
  concatenated and divided by the number of channels: how sharp or smooth an image is, wherever its edges lie.
* ``orientation``: per channel, histograms of oriented gradients (HOG; Dalal and Triggs 2005) of the image
  resized to ``size`` per in-plane axis: the in-plane gradient of every pixel (the last two spatial axes)
  votes with its magnitude for one of `ORIENTATIONS` unsigned directions, counted in `CELLS` x `CELLS` cells
  (averaged over any further spatial axis), each channel's vector L2-normalised: which way the edges run, and
  roughly where, whatever the intensities.
* ``radiomics`` (2D, optional extra): IBSI first-order, histogram, GLCM and GLRLM features computed by mirp,
  log-compressed (`imaging_meta.learners.descriptors.radiomics`).

A learner compares a task's items in a *space*: one descriptor or several ("pixels+histogram").
`task_features` centres each descriptor on the mean of the task's support items, L2-normalises every item,
and concatenates the descriptors of a space divided by the square root of their number: each descriptor counts
equally, and every vector has unit norm (or is zero). Only the support (never a query, never a label) sets
the centre, so a query's vector depends on the support and on itself alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from imaging_meta.learners.descriptors.colour import shared_channels

#: the descriptors, by name
DESCRIPTORS = ("pixels", "histogram", "gradient", "orientation", "radiomics")
#: gradient magnitudes are binned over [0, GRADIENT_RANGE]; a step from 0 to 1 between neighbours gives 0.5
#: (central difference) inside the image
GRADIENT_RANGE = 0.5
#: the ``orientation`` descriptor's unsigned directions over [0, pi), and its cells per in-plane axis
ORIENTATIONS, CELLS = 8, 2
#: a centred pixel vector with a smaller norm is a constant image (rounding residue): it becomes the zero vector
FLAT = 1e-6


def _items(images: torch.Tensor) -> torch.Tensor:
    if images.dim() < 3:
        raise ValueError(f"descriptors take items (N, C, *spatial), got shape {tuple(images.shape)}")
    return images.float()


def grey(images: torch.Tensor) -> torch.Tensor:
    """(N, C, *spatial) -> (N, 1, *spatial) float: the mean of the channels."""
    return _items(images).mean(1, keepdim=True)


def pixel_descriptor(images: torch.Tensor, size: int = 32) -> torch.Tensor:
    """Raw pixels: each channel area-resized to ``size`` per axis, flattened, zero mean and unit norm per item.

    Args:
        images: (N, C, *spatial) with 1 to 3 spatial axes, intensities in [0, 1].
        size: output pixels per spatial axis.

    Returns:
        (N, C * size ** n_spatial).
    """
    g = _items(images)
    n_spatial = g.dim() - 2
    if not 1 <= n_spatial <= 3 or size < 1:
        raise ValueError(f"pixel_descriptor takes 1 to 3 spatial axes and size >= 1, got {tuple(images.shape)}, {size}")
    small = F.interpolate(g, size=(size,) * n_spatial, mode="area").flatten(1)
    centred = small - small.mean(1, keepdim=True)
    norm = centred.norm(dim=1, keepdim=True)
    # a constant image leaves rounding residue only: the zero vector, not a normalised residue
    return torch.where(norm > FLAT, centred / norm.clamp(min=FLAT), torch.zeros_like(centred))


def histogram(values: torch.Tensor, bins: int = 32, high: float = 1.0) -> torch.Tensor:
    """Per-row histograms of ``values`` (N, M) over ``bins`` equal bins of [0, high], L1-normalised: (N, bins).

    Values outside [0, high] are clamped into the end bins; counting is exact and deterministic.
    """
    if bins < 1 or values.dim() != 2 or values.shape[1] == 0:
        raise ValueError(f"histogram takes (N, M > 0) values and bins >= 1, got {tuple(values.shape)}, {bins}")
    n, m = values.shape
    index = (values.clamp(0.0, high) * (bins / high)).long().clamp_(max=bins - 1)
    index = index + bins * torch.arange(n, device=values.device).unsqueeze(1)
    counts = torch.bincount(index.flatten(), minlength=n * bins).view(n, bins)
    return counts.float() / m


def intensity_histogram(images: torch.Tensor, bins: int = 32) -> torch.Tensor:
    """Histograms of each channel's intensities over [0, 1], concatenated: (N, C * bins), rows sum to 1."""
    x = _items(images)
    c = x.shape[1]
    return histogram(x.flatten(2).flatten(0, 1), bins).view(x.shape[0], c * bins) / c


def gradient_histogram(images: torch.Tensor, bins: int = 32) -> torch.Tensor:
    """Histograms of each channel's gradient magnitude (central differences) over [0, GRADIENT_RANGE],
    concatenated: (N, C * bins), rows sum to 1."""
    x = _items(images)
    n, c = x.shape[:2]
    g = x.flatten(0, 1)  # (N * C, *spatial)
    # along the axes of at least 2 pixels (a patch one slice deep, (1, H, W), has no gradient across its slice)
    axes = tuple(a for a in range(1, g.dim()) if g.shape[a] >= 2)
    if g[0].numel() == 0:  # (`_items` has already asked for a channel axis and a spatial one)
        raise ValueError(f"gradient_histogram takes items (N, C, *spatial), got {tuple(images.shape)}")
    if axes:
        magnitude = torch.stack(torch.gradient(g, dim=axes)).pow(2).sum(0).sqrt()
    else:  # one pixel: no gradient
        magnitude = torch.zeros_like(g)
    return histogram(magnitude.flatten(1), bins, GRADIENT_RANGE).view(n, c * bins) / c


def orientation_histogram(images: torch.Tensor, size: int = 32) -> torch.Tensor:
    """Histograms of oriented gradients (HOG) per channel, concatenated: (N, C * ORIENTATIONS * CELLS ** 2).

    Each channel is resized to ``size`` x ``size`` in plane (the last two spatial axes; by area, or bilinearly
    when an axis is smaller, where repeated pixels would make a staircase of every oblique edge), its in-plane gradient taken by central differences, and each pixel's
    magnitude added to the bin of its unsigned direction (``atan2`` modulo pi, `ORIENTATIONS` equal bins centred on
    0, pi / `ORIENTATIONS`, ...) in its
    cell of a `CELLS` x `CELLS` grid; further spatial axes are averaged. Each channel's vector is L2-normalised
    (a constant channel gives zeros).
    """
    x = _items(images)
    if not 2 <= x.dim() - 2 <= 3 or size < 2:
        raise ValueError(f"orientation_histogram takes 2 or 3 spatial axes and size >= 2, got "
                         f"{tuple(images.shape)}, {size}")
    n, c = x.shape[:2]
    planes = x.reshape(n * c, -1, *x.shape[-2:])  # (N * C, P, H, W): P planes (1 for 2D items)
    if min(planes.shape[-2:]) >= size:
        planes = F.interpolate(planes, size=(size, size), mode="area")
    else:  # upsampled: area would repeat pixels, a staircase that turns a 45-degree edge into 0 and 90 (a review)
        planes = F.interpolate(planes, size=(size, size), mode="bilinear", align_corners=False,
                               antialias=max(planes.shape[-2:]) > size)
    gy, gx = torch.gradient(planes, dim=(2, 3))
    magnitude = torch.sqrt(gx * gx + gy * gy)
    # bins centred on the directions 0, pi / O, ...: a horizontal or vertical edge (the commonest) lies in the middle
    # of its bin, not on the edge between two, where rounding (gy = -1e-8 after resampling) would split it
    direction = torch.remainder(torch.atan2(gy, gx), math.pi)
    index = torch.remainder(torch.floor(direction * (ORIENTATIONS / math.pi) + 0.5), ORIENTATIONS).long()
    votes = F.one_hot(index, ORIENTATIONS).to(magnitude.dtype) * magnitude.unsqueeze(-1)  # (NC, P, H, W, O)
    votes = votes.mean(1).permute(0, 3, 1, 2)  # (NC, O, H, W)
    cells = F.adaptive_avg_pool2d(votes, CELLS).flatten(1)  # (NC, O * CELLS ** 2)
    norm = cells.norm(dim=1, keepdim=True)
    cells = torch.where(norm > FLAT, cells / norm.clamp(min=FLAT), torch.zeros_like(cells))
    return cells.view(n, -1)


def describe(images: torch.Tensor, descriptor: str, size: int = 32, bins: int = 32) -> torch.Tensor:
    """The descriptor named ``descriptor`` (one of `DESCRIPTORS`) of items (N, C, *spatial): (N, D)."""
    if descriptor == "pixels":
        return pixel_descriptor(images, size)
    if descriptor == "histogram":
        return intensity_histogram(images, bins)
    if descriptor == "gradient":
        return gradient_histogram(images, bins)
    if descriptor == "orientation":
        return orientation_histogram(images, max(2, size))  # a gradient needs two pixels (``size`` 1: pixels only)
    if descriptor == "radiomics":
        from imaging_meta.learners.descriptors.radiomics import radiomics_descriptor

        return radiomics_descriptor(images)
    raise ValueError(f"unknown descriptor {descriptor!r}; choose from {DESCRIPTORS}")


def parse_space(space: str) -> tuple[str, ...]:
    """The descriptors of a space name such as ``"pixels+histogram"`` (checked: known, each once)."""
    parts = tuple(p.strip() for p in str(space).split("+"))
    if not parts or any(p not in DESCRIPTORS for p in parts) or len(set(parts)) != len(parts):
        raise ValueError(f"features must be descriptors from {DESCRIPTORS} joined by '+', each once; got {space!r}")
    return parts


def task_normalise(support: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre a task's vectors on the mean of its support items and L2-normalise each.

    Args:
        support: (T, S, D) support vectors.
        query: (T, Q, D) query vectors.

    Returns:
        The (T, S, D) and (T, Q, D) normalised vectors (a vector equal to the centre becomes zero).
    """
    centre = support.mean(1, keepdim=True)
    return F.normalize(support - centre, dim=-1), F.normalize(query - centre, dim=-1)


def concatenate_spaces(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate per-space `task_normalise`d (support, query) vectors, each space weighted 1/sqrt(#spaces)."""
    if not parts:
        raise ValueError("concatenate_spaces needs at least one space")
    w = 1.0 / math.sqrt(len(parts))
    return torch.cat([s for s, _ in parts], -1) * w, torch.cat([q for _, q in parts], -1) * w


def descriptor_vectors(
    images: torch.Tensor, descriptors: Sequence[str], size: int = 32, bins: int = 32
) -> dict[str, torch.Tensor]:
    """Each descriptor of a batch of tasks' items (T, N, C, *spatial): name -> (T, N, D)."""
    flat = images.flatten(0, 1)
    return {d: describe(flat, d, size, bins).unflatten(0, images.shape[:2]) for d in descriptors}


def task_features(
    support_images: torch.Tensor,
    query_images: torch.Tensor,
    descriptors: Sequence[str],
    size: int = 32,
    bins: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A space's task-normalised vectors (see the module docstring).

    Args:
        support_images: (T, S, C, *spatial) (one channel kept when all items are grey: `shared_channels`).
        query_images: (T, Q, C, *spatial).
        descriptors: the space's descriptors (`parse_space`).
        size: pixels per axis of the ``pixels`` descriptor.
        bins: histogram bins.

    Returns:
        (T, S, D) support and (T, Q, D) query vectors, D the sum of the descriptors' sizes.
    """
    support_images, query_images = shared_channels(support_images, query_images)
    s = descriptor_vectors(support_images, descriptors, size, bins)
    q = descriptor_vectors(query_images, descriptors, size, bins)
    return concatenate_spaces([task_normalise(s[d], q[d]) for d in descriptors])
