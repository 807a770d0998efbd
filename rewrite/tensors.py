"""Exact torch <-> numpy conversion at the boundary of the file formats (which are numpy-only).

Every value keeps its dtype and bits. bfloat16 has no `Tensor.numpy()`: it crosses as its 16-bit pattern and is
read on the numpy side as `ml_dtypes.bfloat16`.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import torch


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def from_numpy(array: np.ndarray) -> torch.Tensor:
    """A tensor on the CPU sharing `array`'s memory."""
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(array)
