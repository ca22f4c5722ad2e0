"""``facegan synth``: synthesize a dataset from the ICT model and write it as a dataset folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from facegan.data.dataset import Labels, RegisteredDataset, write_dataset
from facegan.data.ict import load_ict
from facegan.data.synth import synthesize


def synthesize_dataset(
    out: str | os.PathLike,
    profile: str = "small",
    seed: int = 0,
    ict_path: str | os.PathLike | None = None,
    method: str = "transfer",
    progress: bool = True,
) -> RegisteredDataset:
    """Synthesize (see :func:`facegan.data.synth.synthesize`) and write the dataset at ``out``.

    The ICT model's MIT license and credits are copied beside the data derived from it.
    """
    ict = load_ict(ict_path)
    result = synthesize(ict, profile=profile, seed=seed, method=method, progress=progress)
    labels = Labels({k: [str(v) for v in col] for k, col in result.labels.items()})
    ds = write_dataset(out, result.template, result.meshes, labels, result.factors, provenance={"source": "ict-synth", **result.info})
    for name in ("LICENSE", "CREDITS.md"):
        if (Path(ict.source) / name).exists():
            shutil.copyfile(Path(ict.source) / name, Path(out) / f"ICT-{name}")
    return ds
