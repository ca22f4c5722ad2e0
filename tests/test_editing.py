"""Latent-space editing (supplementary, Figures 9 and 10): expression transfer and addition,
interpolation, and the edit file outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from facegan.errors import FaceganError
from facegan.fit import fitting
from facegan.fit.editing import (add_expression, add_factor, check_codes, edit_meshes, interpolate, keep_detail,
                                 replace_factor, transfer_expression)
from facegan.fit.fitting import FitOptions
from facegan.fit.outputs import codes_to_json, edit_files, interpolate_files, load_codes
from facegan.sampling import codec_of
from facegan.mesh.io import read_mesh_vertices, write_mesh
from test_fitting import small_model

FAST = FitOptions(iterations=100, precision="fp32", max_restarts=0, threads=1)


@pytest.fixture(scope="module")
def model():
    return small_model()


@pytest.fixture(scope="module")
def codes(model):
    """Three sampled faces: {identity (3, 6), expression (3, 4), noise (3, 2)}."""
    return model.sample(3, seed=2)[1]


def _row(codes, i):
    return {k: v[i:i + 1] for k, v in codes.items()}


def test_transfer_with_source_equal_target_is_identity(model, codes):
    edited = transfer_expression(codes, codes)
    assert all(torch.equal(edited[k], codes[k]) for k in codes)
    torch.testing.assert_close(edit_meshes(model, edited), edit_meshes(model, codes), atol=0, rtol=0)


def test_transfer_replaces_only_the_expression(codes):
    target, source = _row(codes, 0), _row(codes, 1)
    edited = transfer_expression(target, source)
    assert torch.equal(edited["expression"], source["expression"])
    assert torch.equal(edited["identity"], target["identity"]) and torch.equal(edited["noise"], target["noise"])


def test_add_with_zero_code_equals_target(model, codes):
    zero = {k: torch.zeros_like(v) for k, v in codes.items()}
    edited = add_expression(codes, zero)
    assert all(torch.equal(edited[k], codes[k]) for k in codes)
    torch.testing.assert_close(edit_meshes(model, edited, "sparse"), edit_meshes(model, codes, "sparse"),
                               atol=0, rtol=0)


def test_add_sums_the_expression_codes(codes):
    target, source = _row(codes, 0), _row(codes, 2)
    edited = add_expression(target, source)
    torch.testing.assert_close(edited["expression"], target["expression"] + source["expression"])
    assert torch.equal(edited["identity"], target["identity"])


@pytest.mark.parametrize("factor", ["identity", "expression"])
def test_interpolate_endpoints_equal_the_inputs(model, codes, factor):
    a, b = _row(codes, 0), _row(codes, 1)
    steps = 5
    mixed = interpolate(a, b, factor, steps)
    assert mixed[factor].shape == (steps, a[factor].shape[1])
    assert all(torch.equal(mixed[k][:1], a[k]) for k in a)
    assert torch.equal(mixed[factor][-1:], b[factor])
    other = [k for k in a if k != factor]
    assert all(torch.equal(mixed[k], a[k].expand(steps, -1)) for k in other)  # other codes kept from a
    meshes = edit_meshes(model, mixed)  # equal codes; the batch size only changes the summation order
    torch.testing.assert_close(meshes[:1], edit_meshes(model, a), atol=1e-4, rtol=0)
    torch.testing.assert_close(meshes[-1:], edit_meshes(model, {**a, factor: b[factor]}), atol=1e-4, rtol=0)
    # the middle is linear in the code
    torch.testing.assert_close(mixed[factor][2], (a[factor][0] + b[factor][0]) / 2)


def test_interpolate_batches_rows(codes):
    mixed = interpolate(codes, _row(codes, 2), "identity", steps=3)  # 3 pairs, b broadcast
    assert mixed["identity"].shape == (9, 6)
    assert torch.equal(mixed["identity"][3], codes["identity"][1])  # row b*steps is a's row b
    assert torch.equal(mixed["identity"][5], codes["identity"][2])


def test_edits_generalize_to_any_factor(codes):
    extra = {**codes, "age": torch.randn(3, 2)}
    edited = replace_factor(extra, {**codes, "age": torch.zeros(3, 2)}, "age")
    assert torch.equal(edited["age"], torch.zeros(3, 2)) and torch.equal(edited["expression"], codes["expression"])
    summed = add_factor(extra, extra, "identity")
    torch.testing.assert_close(summed["identity"], 2 * codes["identity"])


def test_broadcast_one_source_to_many_targets(codes):
    edited = transfer_expression(codes, _row(codes, 0))
    assert torch.equal(edited["expression"], codes["expression"][:1].expand(3, -1))
    assert torch.equal(edited["identity"], codes["identity"])


def test_editing_errors(model, codes):
    with pytest.raises(FaceganError, match="no 'mood'"):
        transfer_expression(codes, codes, factor="mood")
    two = {k: v[:2] for k, v in codes.items()}
    with pytest.raises(FaceganError, match="2 source rows|3 target rows"):
        transfer_expression(codes, two)
    with pytest.raises(FaceganError, match="steps"):
        interpolate(codes, codes, steps=1)
    with pytest.raises(FaceganError, match="NaN"):
        check_codes({**codes, "noise": torch.full((3, 2), float("nan"))})
    with pytest.raises(FaceganError, match="noise"):
        edit_meshes(model, {k: v for k, v in codes.items() if k != "noise"})
    with pytest.raises(FaceganError, match="needs"):
        edit_meshes(model, {**codes, "identity": torch.zeros(3, 5)})


# ------------------------------------------------------------------------------------ files


def _codes_file(path, codes):
    path.write_text(json.dumps(codes_to_json(codes)))
    return path


def test_edit_files_from_codes(model, codes, tmp_path):
    src = _codes_file(tmp_path / "src.json", _row(codes, 0))
    tgt = _codes_file(tmp_path / "tgt.json", {k: v[1:] for k, v in codes.items()})
    out = tmp_path / "edit"
    meshes = edit_files(out, model, src, tgt)
    assert set(meshes) == {"transfer", "add"} and meshes["transfer"].shape[0] == 2
    assert (out / "edits.png").is_file()
    written = sorted(p.name for p in (out / "meshes").iterdir())
    assert written == sorted(f"tgt{i}_from_src0_{op}.obj" for i in range(2) for op in ("transfer", "add"))
    n_vertices = codec_of(model).template.n_vertices
    mesh = read_mesh_vertices(out / "meshes" / "tgt1_from_src0_transfer.obj", n_vertices)
    np.testing.assert_allclose(mesh, meshes["transfer"][1].numpy(), atol=1e-5)
    replaced = load_codes(out / "codes_transfer.json", model)
    assert torch.equal(replaced["expression"], codes["expression"][:1].expand(2, -1))
    torch.testing.assert_close(replaced["identity"], codes["identity"][1:])


def test_edit_files_from_meshes_fits_them_first(model, codes, tmp_path):
    template = codec_of(model).template
    faces = edit_meshes(model, codes, "sparse")
    paths = []
    for i in range(2):
        write_mesh(tmp_path / f"m{i}.obj", faces[i].numpy(), template.triangles)
        paths.append(tmp_path / f"m{i}.obj")
    out = tmp_path / "edit"
    meshes = edit_files(out, model, [paths[0]], [paths[1]], operations=["transfer"], options=FAST, method="sparse")
    assert meshes["transfer"].shape == (1, faces.shape[1], 3)
    assert [p.name for p in (out / "meshes").iterdir()] == ["m1_from_m0_transfer.obj"]
    # the source's expression on the target's identity: close to the model's own edit of the true codes
    truth = edit_meshes(model, transfer_expression(_row(codes, 1), _row(codes, 0)), "sparse")
    scale = (faces[0] - faces[1]).norm(dim=-1).mean()
    assert (meshes["transfer"] - truth).norm(dim=-1).mean() < 0.1 * scale


def test_keep_detail_adds_the_edit_to_the_input_mesh():
    inputs, fitted, edited = torch.randn(3, 2, 5, 3).unbind(0)
    torch.testing.assert_close(keep_detail(edited, fitted, inputs), inputs + edited - fitted)
    torch.testing.assert_close(keep_detail(fitted, fitted, inputs), inputs)  # no edit: the input, detail and all


def test_edit_files_keeps_the_target_meshes_detail(model, codes, tmp_path):
    """With detail, the edit is the change it makes to the fitted target, added to the target mesh: a
    target edited with its own codes comes back exactly, a bump the model cannot make included."""
    template = codec_of(model).template
    faces = edit_meshes(model, codes, "sparse")
    target = faces[1].clone()
    target[0] += torch.tensor([0.0, 0.0, 2.0])  # detail beyond the model
    write_mesh(tmp_path / "src.obj", faces[0].numpy(), template.triangles)
    write_mesh(tmp_path / "tgt.obj", target.numpy(), template.triangles)
    read = torch.from_numpy(read_mesh_vertices(tmp_path / "tgt.obj"))
    out = tmp_path / "edit"
    same = edit_files(out, model, [tmp_path / "tgt.obj"], [tmp_path / "tgt.obj"], operations=["transfer"],
                      options=FAST, detail=True)
    torch.testing.assert_close(same["transfer"][0], read, atol=1e-4, rtol=0)
    moved = edit_files(tmp_path / "edit2", model, [tmp_path / "src.obj"], [tmp_path / "tgt.obj"],
                       operations=["transfer", "add"], options=FAST, detail=True)
    plain = edit_files(tmp_path / "edit3", model, [tmp_path / "src.obj"], [tmp_path / "tgt.obj"],
                       operations=["transfer"], options=FAST)
    fitted = edit_meshes(model, fitting.fit_meshes(model, read[None].numpy(), options=FAST).codes)
    torch.testing.assert_close(moved["transfer"], read + plain["transfer"] - fitted, atol=1e-4, rtol=0)
    with pytest.raises(FaceganError, match="needs the target meshes"):
        edit_files(tmp_path / "edit4", model, _codes_file(tmp_path / "c.json", codes), tmp_path / "c.json", detail=True)
    assert not (tmp_path / "edit4").exists()


def test_codes_from_facegan_sample_are_read_with_their_names(model, codes, tmp_path):
    """``facegan sample`` writes names and metadata beside the code lists."""
    sample = {"names": ["s0000", "s0001", "s0002"], "fix": None, "seed": 2, "model": "run", **codes_to_json(codes)}
    (tmp_path / "codes.json").write_text(json.dumps(sample))
    torch.testing.assert_close(load_codes(tmp_path / "codes.json", model)["expression"], codes["expression"])
    out = tmp_path / "edit"
    edit_files(out, model, tmp_path / "codes.json", tmp_path / "codes.json", operations=["add"])
    assert sorted(p.name for p in (out / "meshes").iterdir()) == [f"s000{i}_from_s000{i}_add.obj" for i in range(3)]


def test_interpolate_files(model, codes, tmp_path):
    a = _codes_file(tmp_path / "a.json", _row(codes, 0))
    b = _codes_file(tmp_path / "b.json", _row(codes, 1))
    out = tmp_path / "interp"
    meshes = interpolate_files(out, model, a, b, factor="expression", steps=4)
    assert meshes.shape[:2] == (1, 4)
    assert (out / "interpolation.png").is_file() and len(list((out / "meshes").iterdir())) == 4
    torch.testing.assert_close(meshes[0, 0], edit_meshes(model, _row(codes, 0))[0])
    assert load_codes(out / "codes.json", model)["expression"].shape == (4, 4)


@pytest.mark.parametrize("case", ["bad-json", "wrong-size", "unknown-factor", "mixed", "operation", "rows"])
def test_edit_files_bad_input_writes_nothing(model, codes, tmp_path, case):
    src = _codes_file(tmp_path / "src.json", codes)
    tgt = _codes_file(tmp_path / "tgt.json", codes)
    kwargs = {}
    if case == "bad-json":
        src.write_text("{not json")
    elif case == "wrong-size":
        _codes_file(src, {**codes, "identity": torch.zeros(3, 7)})
    elif case == "unknown-factor":
        kwargs["factor"] = "mood"
    elif case == "mixed":
        src = [src, tmp_path / "face.obj"]
    elif case == "operation":
        kwargs["operations"] = ["multiply"]
    elif case == "rows":
        _codes_file(tgt, {k: v[:2] for k, v in codes.items()})
    out = tmp_path / "edit"
    with pytest.raises(FaceganError):
        edit_files(out, model, src, tgt, **kwargs)
    assert not out.exists()


def test_gan_transfer_gives_the_edit_and_both_fits_from_one_fit(model, codes):
    """GanGenerator.transfer: the target with its source's expression, and the targets' and sources'
    own fits, all decoded densely; a face that is both a target and a source has one fit."""
    from facegan.evaluation.generators import GanGenerator

    faces = edit_meshes(model, codes).numpy()
    gan = GanGenerator(model, fit_options=FAST)
    targets, sources = faces[:2], faces[1:]
    result = gan.transfer(targets, sources)
    assert all(x.shape == targets.shape for x in result)
    np.testing.assert_allclose(result.target_fit[1], result.source_fit[0], atol=1e-4)  # face 1, fitted once each way
    same = gan.transfer(targets, targets)
    np.testing.assert_allclose(same.edited, same.target_fit, atol=1e-4)  # its own expression: no edit
    np.testing.assert_allclose(same.source_fit, same.target_fit, atol=1e-4)
