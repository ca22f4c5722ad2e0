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
