"""The decoupling diagnosis: code effects read what each code moves, feature floors measure the feature loss
over real and generated pairs with the measure training uses."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from facegan.errors import FaceganError
from facegan.evaluation.diagnose import code_effects, feature_floors, fixed_code_accuracy, load_discriminator
from facegan.metrics.oracle import OracleProjector
from facegan.model import FaceModel
from facegan.train.loop import train
from tests.test_train import synth, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


class SeparableModel:
    """A 4-vertex "model" whose vertex 0 is z_id[:3], vertex 2 is z_exp[:3]; the noise moves nothing."""

    factors = ["identity", "expression"]
    code_sizes = [5, 4]
    noise_size = 2
    device = torch.device("cpu")

    def draw(self, name: str, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(n, dict(zip(self.factors, self.code_sizes), noise=self.noise_size)[name], generator=generator)

    def generate(self, codes: list[torch.Tensor], noise: torch.Tensor) -> torch.Tensor:
        meshes = torch.zeros(len(noise), 4, 3)
        meshes[:, 0], meshes[:, 2] = codes[0][:, :3], codes[1][:, :3]
        return meshes.reshape(-1, 3, 2, 2)


def test_code_effects_read_which_code_moves_what():
    """Identity modes move vertex 0, expression modes vertex 2: varying z_id moves only the identity,
    z_exp only the expression, the noise neither."""
    unit = np.eye(3)
    modes = lambda vertex: np.stack([np.eye(4)[vertex][:, None] * unit[c] for c in range(3)])  # (3, 4, 3)
    projector = OracleProjector(SimpleNamespace(neutral=np.zeros((4, 3)), identity_modes=modes(0),
                                                expression_modes=modes(2)))
    rng = np.random.default_rng(0)
    reference = {"identity": rng.standard_normal((2000, 3)), "expression": rng.standard_normal((2000, 3))}
    effects = code_effects(SeparableModel(), lambda x: x.reshape(len(x), 4, 3).numpy(), projector, reference,
                           groups=20, size=50)
    assert effects["identity"]["identity"] == pytest.approx(1.0, abs=0.15)
    assert effects["expression"]["expression"] == pytest.approx(1.0, abs=0.15)
    for code, moved in [("identity", "expression"), ("expression", "identity"), ("noise", "identity"),
                        ("noise", "expression")]:
        assert effects[code][moved] == pytest.approx(0.0, abs=1e-9)


def test_feature_floors_of_a_trained_run(tmp_path):
    data = synth()
    run = tmp_path / "run"
    train(data, tiny_config("epochs=1"), run)
    discriminator, branch_factors, _ = load_discriminator(run / "checkpoint.safetensors", data)
    assert branch_factors == [0, 1]
    floors = feature_floors(FaceModel.load(run / "checkpoint.safetensors"), discriminator, branch_factors, data,
                            pairs=16)
    assert set(floors) == {"real: same identity, other expression", "real: same expression, other identity",
                           "real: random pairs", "recombined: one expression, two new identities",
                           "generated: shared z_identity", "generated: shared z_expression"}
    for row in floors.values():
        assert set(row) == {"identity", "expression"}
        assert all(0.0 <= v <= 2.0 for v in row.values())
    accuracy = fixed_code_accuracy(FaceModel.load(run / "checkpoint.safetensors"), discriminator, branch_factors,
                                   data.factors, per_class=3)
    assert set(accuracy) == {"identity", "expression"} and all(0.0 <= a <= 1.0 for a in accuracy.values())
    with pytest.raises(FaceganError, match="holds no discriminator"):
        load_discriminator(run / "model.safetensors", data)
    with pytest.raises(FaceganError, match="other factors or classes"):
        load_discriminator(run / "checkpoint.safetensors", synth(n_classes=(4, 2)))


def test_feature_floors_use_the_linear_descriptor_a_run_trained_with(tmp_path):
    """A run trained with the fixed linear descriptor is diagnosed with it: the expression column is the
    distance of those descriptors; the identity column keeps Eq. 9's cosine."""
    data = synth()
    run = tmp_path / "run"
    train(data, tiny_config("epochs=1", "descriptor_size=3", "descriptor=linear"), run)
    discriminator, branch_factors, linear = load_discriminator(run / "checkpoint.safetensors", data)
    assert linear is not None and linear.weights.shape == (3, 3, 16, 16)
    model = FaceModel.load(run / "checkpoint.safetensors")
    floors = feature_floors(model, discriminator, branch_factors, data, pairs=64, linear=linear)
    cosine = feature_floors(model, discriminator, branch_factors, data, pairs=64)
    for kind, row in floors.items():
        assert row["identity"] == cosine[kind]["identity"]  # C_id keeps Eq. 9's cosine
        assert row["expression"] != cosine[kind]["expression"]
