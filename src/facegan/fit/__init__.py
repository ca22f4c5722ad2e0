"""Fitting latent codes to registered meshes (Sec. 4.2, Eq. 12) and editing faces in latent space.

- :func:`fit_meshes` -> :class:`FitResult`: codes, fitted vertices, per-vertex errors, restarts;
- :mod:`facegan.fit.editing`: transfer / add / interpolate codes (supplementary, Figures 9 and 10);
- :mod:`facegan.fit.outputs`: the files the command line writes (meshes, codes, errors, figures).
See docs/fitting.md.
"""

from facegan.fit.editing import (
    add_expression,
    add_factor,
    check_codes,
    edit_meshes,
    interpolate,
    keep_detail,
    replace_factor,
    transfer_expression,
)
from facegan.fit.fitting import (
    PAPER_PRIOR_WEIGHT,
    FitOptions,
    FitResult,
    VertexReader,
    decode_codes,
    fit_meshes,
    join_codes,
    split_codes,
)
from facegan.fit.outputs import (
    edit_files,
    fit_files,
    fit_split,
    interpolate_files,
    load_codes,
    load_vertex_mask,
)

__all__ = [
    "PAPER_PRIOR_WEIGHT",
    "FitOptions",
    "FitResult",
    "VertexReader",
    "add_expression",
    "add_factor",
    "check_codes",
    "decode_codes",
    "edit_files",
    "edit_meshes",
    "fit_files",
    "fit_meshes",
    "fit_split",
    "interpolate",
    "interpolate_files",
    "join_codes",
    "keep_detail",
    "load_codes",
    "load_vertex_mask",
    "replace_factor",
    "split_codes",
    "transfer_expression",
]
