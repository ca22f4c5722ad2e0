"""The shipped model samples right after install; grouped samples share a code; exporting a model
from a training checkpoint keeps exactly what sampling needs."""

import json
import subprocess
import sys

import pytest
import torch

import facegan
from facegan.errors import FaceganError
from facegan.sampling import SHIPPED_MODEL, group_names
from facegan.train.checkpoint import export_model_from_checkpoint, save_checkpoint

needs_shipped = pytest.mark.skipif(not SHIPPED_MODEL.exists(), reason="no shipped model in this checkout")


def test_group_names_sort_by_group():
    names = group_names(12, 3)
    assert names[:4] == ["g000_m00", "g000_m01", "g000_m02", "g001_m00"]
    assert names == sorted(names)


@needs_shipped
def test_shipped_model_samples_shared_identity_codes():
    model = facegan.load(device="cpu")
    images, codes = model.sample(2, fix="identity", m=3, seed=1)
    assert images.shape == (6, 3, model.resolution, model.resolution)
    assert torch.equal(codes["identity"][0], codes["identity"][2])
    assert not torch.equal(codes["identity"][0], codes["identity"][3])
    assert not torch.equal(codes["expression"][0], codes["expression"][1])


@needs_shipped
def test_sample_command_writes_meshes_codes_and_grid(tmp_path):
    out = tmp_path / "s"
    done = subprocess.run([sys.executable, "-m", "facegan", "sample", "--n", "2", "--fix", "expression", "--m", "2",
                           "-o", str(out), "--format", "ply"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.glob("*.ply")) == ["g000_m00.ply", "g000_m01.ply", "g001_m00.ply", "g001_m01.ply"]
    codes = json.loads((out / "codes.json").read_text())
    assert codes["expression"][0] == codes["expression"][1] and len(codes["identity"]) == 4
    assert (out / "grid.png").stat().st_size > 0


def test_export_keeps_only_the_sampling_tensors(tmp_path):
    tensors = {"G_ema.w": torch.ones(2), "D.w": torch.ones(3), "opt_G.m": torch.ones(1),
               "fixed_codes.identity": torch.zeros(4, 2), "codec.mean": torch.zeros(5, 3)}
    meta = {"kind": "checkpoint", "factors": ["identity"], "iteration": 7, "opt_D": [], "data": {}}
    save_checkpoint(tmp_path / "checkpoint.safetensors", tensors, meta)
    export_model_from_checkpoint(tmp_path / "checkpoint.safetensors", tmp_path / "model.safetensors")
    from facegan.train.checkpoint import load_checkpoint

    got, got_meta = load_checkpoint(tmp_path / "model.safetensors")
    assert sorted(got) == ["G_ema.w", "codec.mean", "fixed_codes.identity"]
    assert got_meta == {"kind": "model", "factors": ["identity"], "iteration": 7}
    with pytest.raises(FaceganError, match="not a training checkpoint"):
        export_model_from_checkpoint(tmp_path / "model.safetensors", tmp_path / "again.safetensors")


def fake_run_checkpoint(path, real_codes: torch.Tensor | None) -> None:
    """A checkpoint of a two-factor run (codes of sizes 3 and 2, noise 1) with an optional real-code table."""
    tensors = {"G_ema.w": torch.ones(2), "fixed_codes.identity": torch.zeros(4, 3)}
    if real_codes is not None:
        tensors["real_codes"] = real_codes
    meta = {"kind": "checkpoint", "factors": ["identity", "expression"], "code_sizes": [3, 2], "noise_size": 1}
    save_checkpoint(path, tensors, meta)


def test_export_with_a_code_bank_keeps_the_visited_faces_codes(tmp_path):
    table = torch.arange(5 * 6, dtype=torch.float32).reshape(5, 6) + 1
    table[3] = 0  # a face the run never visited
    fake_run_checkpoint(tmp_path / "checkpoint.safetensors", table)
    export_model_from_checkpoint(tmp_path / "checkpoint.safetensors", tmp_path / "model.safetensors",
                                 ["expression", "noise"], bandwidth=0.25)
    from facegan.train.checkpoint import load_checkpoint

    got, meta = load_checkpoint(tmp_path / "model.safetensors")
    visited = table[[0, 1, 2, 4]]
    assert torch.equal(got["code_bank.expression"], visited[:, 3:5])
    assert torch.equal(got["code_bank.noise"], visited[:, 5:])
    assert "real_codes" not in got and meta["bank_bandwidth"] == {"expression": 0.25, "noise": 0.25}


def test_the_default_bandwidth_is_silvermans_rule_per_code(tmp_path):
    """h = (4 / ((d + 2) n))^(1 / (d + 4)) for n codes of d dimensions: Silverman's rule of thumb, as
    scipy.stats.gaussian_kde(bw_method="silverman") computes it."""
    fake_run_checkpoint(tmp_path / "checkpoint.safetensors", torch.randn(40, 6))
    export_model_from_checkpoint(tmp_path / "checkpoint.safetensors", tmp_path / "model.safetensors",
                                 ["expression", "noise"])
    from facegan.train.checkpoint import read_metadata

    widths = read_metadata(tmp_path / "model.safetensors")["bank_bandwidth"]
    assert widths["expression"] == pytest.approx((4 / (4 * 40)) ** (1 / 6))
    assert widths["noise"] == pytest.approx((4 / (3 * 40)) ** (1 / 5))
    # a width given per code replaces the rule for that code only
    export_model_from_checkpoint(tmp_path / "checkpoint.safetensors", tmp_path / "model.safetensors",
                                 ["expression", "noise"], {"noise": 0.1})
    assert read_metadata(tmp_path / "model.safetensors")["bank_bandwidth"] == {"expression": widths["expression"],
                                                                              "noise": 0.1}


def test_a_code_bank_needs_the_real_faces_codes_and_known_names(tmp_path):
    fake_run_checkpoint(tmp_path / "plain.safetensors", None)
    with pytest.raises(FaceganError, match="plain.safetensors: no codes of the real faces"):
        export_model_from_checkpoint(tmp_path / "plain.safetensors", tmp_path / "m.safetensors", ["expression"])
    fake_run_checkpoint(tmp_path / "rec.safetensors", torch.ones(2, 6))
    with pytest.raises(FaceganError, match="no code named pose"):
        export_model_from_checkpoint(tmp_path / "rec.safetensors", tmp_path / "m.safetensors", ["pose"])
    with pytest.raises(FaceganError, match="bandwidth"):
        export_model_from_checkpoint(tmp_path / "rec.safetensors", tmp_path / "m.safetensors", ["noise"], -1.0)
    with pytest.raises(FaceganError, match="bandwidth for expression: not a banked code"):
        export_model_from_checkpoint(tmp_path / "rec.safetensors", tmp_path / "m.safetensors", ["noise"],
                                     {"expression": 0.5})
    assert not (tmp_path / "m.safetensors").exists()
    done = subprocess.run([sys.executable, "-m", "facegan", "export-model", str(tmp_path / "plain.safetensors"),
                           "-o", str(tmp_path / "m.safetensors"), "--code-bank", "expression"],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "no codes of the real faces" in done.stderr and not (tmp_path / "m.safetensors").exists()
    done = subprocess.run([sys.executable, "-m", "facegan", "export-model", str(tmp_path / "rec.safetensors"),
                           "-o", str(tmp_path / "m.safetensors"), "--code-bank", "noise", "--bandwidth", "noise:0.3"],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "Traceback" not in done.stderr and "--bandwidth 'noise:0.3'" in done.stderr
    assert not (tmp_path / "m.safetensors").exists()


@needs_shipped
def test_a_banked_code_is_a_bank_row_plus_a_kernel_of_its_bandwidth():
    """draw: N(0, I) without a bank; with one, row i_k of the bank + bandwidth * std * eps_k, i_k uniform."""
    model = facegan.load(device="cpu")
    model.code_bank = {}
    plain = model.draw("expression", 4, torch.Generator().manual_seed(3))
    assert torch.equal(plain, torch.randn(4, 15, generator=torch.Generator().manual_seed(3)))
    bank = torch.randn(30, 15, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.5, 2.0, 15)
    model.code_bank, model.bank_bandwidth = {"expression": bank}, {"expression": 0.2}
    drawn = model.draw("expression", 50, torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(4)
    rows, eps = torch.randint(30, (50,), generator=gen), torch.randn(50, 15, generator=gen)
    for k in range(50):
        expected = [bank[rows[k], d] + 0.2 * bank[:, d].std() * eps[k, d] for d in range(15)]
        assert torch.allclose(drawn[k], torch.stack(expected), atol=1e-6)
    model.bank_bandwidth = {"expression": 0.0}
    _, codes = model.sample(3, fix="identity", m=4, seed=0)  # the bank serves sample() too
    assert all(any(torch.equal(c, row) for row in bank) for c in codes["expression"])
    assert torch.equal(codes["identity"][0], codes["identity"][3])
