"""TensorBoard events of a run (``tensorboard = true``): the statistics of ``log.csv`` and the sample grids.

Optional: the ``tensorboard`` package comes with ``pip install "facegan[tensorboard]"``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from facegan.errors import FaceganError

FOLDER_NAME = "tensorboard"


def require_tensorboard() -> None:
    """Fail before a run starts, not at its first log row, when the package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise FaceganError("config tensorboard=true needs the tensorboard package: "
                           "pip install \"facegan[tensorboard]\"") from None


def scalar_tag(column: str) -> str:
    """log.csv column -> TensorBoard tag, grouped by network: ``d_wdist`` -> ``D/d_wdist``."""
    group = {"d_": "D", "g_": "G"}.get(column[:2], "run")
    return f"{group}/{column}"


class Board:
    """Event files in ``run_dir/tensorboard``. ``resume_from``: the iteration a resumed run restarts at;
    events logged after it by the interrupted process are dropped, as the rows of log.csv are."""

    def __init__(self, run_dir: Path, resume_from: int | None = None) -> None:
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        purge = None if resume_from is None else resume_from + 1
        self.writer = SummaryWriter(str(run_dir / FOLDER_NAME), purge_step=purge)

    def scalars(self, iteration: int, values: dict[str, float]) -> None:
        for column, value in values.items():
            if value is not None and not math.isnan(value):
                self.writer.add_scalar(scalar_tag(column), value, iteration)

    def image(self, tag: str, iteration: int, image: np.ndarray) -> None:
        """image: (H, W, 3) uint8."""
        self.writer.add_image(tag, image, iteration, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()
