"""Small helpers shared by test modules (test modules never import from each other)."""

from pathlib import Path

import numpy as np
from PIL import Image


def write_png(path: Path, array: np.ndarray, **kw) -> Path:
    """Save ``array`` as a PNG at ``path``, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kw)
    return path
