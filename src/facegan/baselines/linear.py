"""The linear baseline (DeepFLAME-like, Sec. 5.5): identity PCA on neutral faces + expression PCA on
displacements from each subject's neutral face.

    face(z_id, z_exp) = mean + z_id @ W_id + z_exp @ W_exp,     z_id, z_exp ~ N(0, I)

W_id (k_id, 3V): the PCA axes of the training identities' neutral faces (each the mean of that
identity's meshes labeled neutral), scaled by their standard deviations; k_id = min(65, identities - 1).
W_exp (k_exp, 3V): the same for the displacements mesh - neutral(identity) of every training mesh whose
identity has a neutral face; k_exp = min(20, displacements - 1). ``mean`` is the sum of the two PCA means.
Sampling z ~ N(0, I) is sampling the PCA coefficients from N(0, diag(variances)).

The fit is the MAP estimate under that prior and isotropic Gaussian noise of ``fit_noise`` mm per
coordinate: ridge least squares in closed form on the whitened codes. A face in the model's span comes
back up to the prior's shrinkage (2e-4 mm on data/ict-small).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from facegan.baselines.common import BaselineModel, BaselineOptions, principal_components, ridge_solve, training_set
from facegan.errors import FaceganError
from facegan.evaluation.generators import register_loader


class LinearModel(BaselineModel):
    """Tensors: mean (3V,), identity_basis (k_id, 3V), expression_basis (k_exp, 3V), float32 mm."""

    kind = "linear"

    def decode(self, codes: dict[str, Tensor]) -> Tensor:
        t = self.tensors
        return (t["mean"].double() + codes["identity"] @ t["identity_basis"].double()
                + codes["expression"] @ t["expression_basis"].double())

    def fit_codes(self, x: Tensor) -> dict[str, Tensor]:
        basis = torch.cat([self.tensors["identity_basis"], self.tensors["expression_basis"]]).double()
        z = ridge_solve(basis @ basis.T, (x - self.tensors["mean"].double()) @ basis.T,
                        self.meta["config"]["fit_noise"] ** 2)
        return dict(zip(self.factors, z.split(list(self.code_sizes.values()), dim=1)))


def train_linear(dataset, options: BaselineOptions | None = None) -> LinearModel:
    """Fit the two PCA models on the train split of ``dataset`` (a RegisteredDataset); takes seconds."""
    options = options or BaselineOptions()
    data = training_set(dataset)
    neutral, has_neutral = data.neutral_faces()  # (I, 3V), (I,)
    if int(has_neutral.sum()) < 2:
        raise FaceganError(f"{dataset.root}: the linear model needs neutral meshes of at least 2 training identities, "
                           f"found {int(has_neutral.sum())}")
    id_mean, id_axes, id_var = principal_components(neutral[has_neutral], options.identity_size, options.seed)
    rows = np.flatnonzero(data.identity >= 0)
    rows = rows[has_neutral.numpy()[data.identity[rows]]]
    displacements = data.flat(rows) - neutral[data.identity[rows]]
    exp_mean, exp_axes, exp_var = principal_components(displacements, options.expression_size, options.seed)
    tensors = {
        "mean": (id_mean + exp_mean).float(),
        "identity_basis": (id_var.sqrt()[:, None] * id_axes).float(),
        "expression_basis": (exp_var.sqrt()[:, None] * exp_axes).float(),
    }
    meta = {
        "name": "linear",
        "n_vertices": data.n_vertices,
        "code_sizes": {"identity": len(id_var), "expression": len(exp_var)},
        "config": options.config("linear"),
        "training": {"neutral_faces": int(has_neutral.sum()), "displacements": len(rows)},
    }
    return LinearModel(tensors, meta)


@register_loader("linear")
def load_linear(path: Path, meta: dict) -> LinearModel:
    """A linear model file (``kind`` "linear") as a FaceGenerator."""
    return LinearModel.load(path)
