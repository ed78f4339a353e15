"""Running sums of training metrics, kept on the device.

Each micro-batch adds its loss, counts and per-step hits to one float64 tensor without a host
sync; a logging window or a validation pass all-reduces that tensor across ranks in one call and
reads the segments by name.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from draftcache.trainer.distributed import DistInfo, all_reduce_sum

__all__ = ["MetricSums"]


class MetricSums:
    """Named float64 segments of one device tensor: ``sizes`` maps each metric to its length
    (1 for a scalar, ``k`` for a per-step or per-slot vector)."""

    def __init__(self, sizes: Mapping[str, int], device: torch.device | str) -> None:
        self._slices: dict[str, slice] = {}
        offset = 0
        for name, size in sizes.items():
            self._slices[name] = slice(offset, offset + int(size))
            offset += int(size)
        self.tensor = torch.zeros(offset, dtype=torch.float64, device=device)

    def add(self, **values: torch.Tensor | float) -> None:
        """Add each named value (a tensor of the segment's length, or a scalar) to its segment."""
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().double()
            self.tensor[self._slices[name]] += value

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensor[self._slices[name]]

    def ratio(self, numerator: str, denominator: str) -> torch.Tensor:
        """``numerator / denominator`` elementwise, a zero count read as 1."""
        return self[numerator] / self[denominator].clamp_min(1)

    def all_reduce(self, info: DistInfo) -> None:
        all_reduce_sum(self.tensor, info)

    def zero_(self) -> None:
        self.tensor.zero_()
