"""pcrl: PCRLv2 self-supervised pretraining of 3D medical-image encoders at cluster scale.

Modules follow the data flow: ``config`` → ``shards`` → ``data`` → ``views`` → ``model`` → ``objective`` →
``engine`` (with ``distributed``, ``checkpoint`` and ``tracking``). Importing the package loads nothing heavy.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from pcrl.model import PCRLv2Encoder

__version__ = "0.1.0"
__all__ = ["__version__", "load_encoder"]


def load_encoder(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> PCRLv2Encoder:
    """Load an exported encoder (``encoder.safetensors`` + ``encoder.json``), shapes checked, no pickle.

    See :func:`pcrl.export.load_encoder`; torch is imported on the first call, not with the package.
    """
    from pcrl.export import load_encoder as _load

    return _load(path, device)
