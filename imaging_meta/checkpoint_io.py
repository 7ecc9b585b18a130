"""`AtomicCheckpointIO`: a checkpoint file is either complete or absent, never half-written.

Lightning writes a local checkpoint through an fsspec transaction whose temporary file lies in the system's
temporary folder; committing it is a move, which becomes a copy when the run folder is on another filesystem
(a cluster's shared disk). A run killed during that copy leaves a truncated ``last.ckpt`` that the next
``fit --ckpt_path last`` would try to trust. Here the bytes go to a temporary file beside the target, are
flushed to disk, and only then take the target's name with ``os.replace``, which is atomic on one
filesystem. Remote URLs (``s3://`` ...) keep Lightning's own writer.

`imaging-meta fit` uses it by default (``trainer.plugins``); any ``plugins`` in a config replace it.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from datamodules.atomic import atomic_open


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` that writes local checkpoints to a temporary file in the same folder, then renames it."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path) or storage_options is not None:
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_open(path, "wb") as f:
            torch.save(checkpoint, f)
