"""The ``facegan`` command: parses options and calls the library. No logic lives here."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import typer

from facegan.errors import FaceganError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Generative 3D face models by adversarial training (Abrevaya et al., ICCV 2019).")

DEFAULT_DATA = Path("data/ict-small")
BANK_HELP = ("Comma-separated codes (factor names or noise) to draw from the training faces' codes instead of N(0, I); "
             "needs a run trained with lambda_rec (docs/training.md, 'Sampling from the real faces' codes').")
BANDWIDTH_HELP = ("Kernel width of the code bank, a fraction of each code dimension's standard deviation: one "
                  "for all codes, or per code as 'identity=0.5,noise=0.3' (default: Silverman's rule).")


def _names(listing: str) -> list[str]:
    """'a, b' -> ['a', 'b']."""
    return [n.strip() for n in listing.split(",") if n.strip()]


def _bandwidth(text: str | None) -> float | dict[str, float] | None:
    """'0.3' -> 0.3; 'identity=0.5, noise=0.3' -> {'identity': 0.5, 'noise': 0.3}; None -> None."""
    if text is None:
        return None
    try:
        if "=" not in text:
            return float(text)
        return {name.strip(): float(width) for name, width in (item.split("=") for item in _names(text))}
    except ValueError:
        raise FaceganError(f"--bandwidth {text!r}: give a number or name=number pairs separated by commas") from None


def _progress() -> bool:
    """Progress bars only on a terminal: piped or logged stderr keeps just the final error line."""
    return sys.stderr.isatty()


@app.command()
def synth(
    out: Path = typer.Option(..., "--out", "-o", help="Dataset folder to create."),
    profile: str = typer.Option("small", help="small (~3,000 meshes) or paper (~30,000 meshes)."),
    seed: int = typer.Option(0, help="Random seed."),
    ict: Optional[Path] = typer.Option(None, help="ICT face model: the compact copy or an ICT-FaceKit clone."),
    method: str = typer.Option("transfer", help="Expressions by deformation 'transfer' or 'additive' offsets."),
) -> None:
    """Synthesize a registered-face dataset from the ICT face model (static + motion + spontaneous)."""
    from facegan.data.build import synthesize_dataset

    ds = synthesize_dataset(out, profile=profile, seed=seed, ict_path=ict, method=method)
    typer.echo(f"wrote {out}: {len(ds)} meshes, {ds.info['counts']}")


@app.command()
def ingest(
    mesh_dir: Path = typer.Argument(..., help="Folder of registered OBJ/PLY meshes (CoMA layout understood)."),
    template: Path = typer.Option(..., "--template", help="Template OBJ (with UVs, or disk-shaped)."),
    out: Path = typer.Option(..., "--out", "-o", help="Dataset folder to create."),
    labels: Optional[Path] = typer.Option(None, help="CSV: mesh_id|file, identity, expression[, split]."),
    test_fraction: float = typer.Option(0.1, help="Fraction of identities held out when no split is given."),
    seed: int = typer.Option(0, help="Seed of the held-out identity draw."),
) -> None:
    """Make a dataset from a folder of registered meshes in the template's topology."""
    from facegan.data.ingest import ingest as run

    ds = run(mesh_dir, template, out, labels, test_fraction, seed, progress=_progress())
    typer.echo(f"wrote {out}: {len(ds)} meshes, {ds.info['counts']}")


@app.command()
def encode(
    data: Path = typer.Argument(..., help="Dataset folder."),
    resolution: int = typer.Option(64, help="Geometry image side: 64, 128 or 256."),
    alpha: Optional[float] = typer.Option(None, help="Laplacian weight of dense reconstruction (default 0.1; paper 1.2)."),
) -> None:
    """Compute and cache the dataset's uint8 geometry images (mean and range from the training split)."""
    from facegan.data.dataset import open_dataset
    from facegan.data.encode import encode_dataset
    from facegan.geometry_image import DEFAULT_ALPHA

    ds = open_dataset(data)
    codec = encode_dataset(ds, resolution, DEFAULT_ALPHA if alpha is None else alpha, progress=_progress())
    typer.echo(f"encoded {len(ds)} meshes at {resolution}px into {data / 'images'} ({int(codec.mask.sum())} chart pixels)")


@app.command("to-image")
def to_image(
    mesh: Path = typer.Argument(..., help="Registered mesh (OBJ/PLY)."),
    data: Path = typer.Option(DEFAULT_DATA, help="Encoded dataset whose codec to use."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .png (uint8) or .npy (float, mm)."),
    resolution: int = typer.Option(64, help="Image side."),
) -> None:
    """Encode one mesh as a geometry image."""
    from facegan.geometry_image.files import mesh_to_image_file

    mesh_to_image_file(mesh, data, out, resolution)
    typer.echo(f"wrote {out}")


@app.command("to-mesh")
def to_mesh(
    image: Path = typer.Argument(..., help="Geometry image (.png uint8 or .npy float mm)."),
    data: Path = typer.Option(DEFAULT_DATA, help="Encoded dataset whose codec to use."),
    out: Path = typer.Option(..., "--out", "-o", help="Output mesh (.obj or .ply)."),
    method: str = typer.Option("dense", help="dense (Laplacian least squares, Eq. 4) or sparse (bilinear)."),
) -> None:
    """Reconstruct a mesh from a geometry image."""
    from facegan.geometry_image.files import image_file_to_mesh

    image_file_to_mesh(image, data, out, method)
    typer.echo(f"wrote {out}")


@app.command()
def render(
    meshes: List[Path] = typer.Argument(..., help="Meshes (OBJ/PLY) to render."),
    out: Path = typer.Option(..., "--out", "-o", help="Output PNG grid."),
    size: int = typer.Option(256, help="Pixels per view."),
) -> None:
    """Shaded headless renders of meshes, as one PNG grid."""
    from facegan.render import render_files

    render_files(list(meshes), out, size=size)
    typer.echo(f"wrote {out}")


@app.command()
def roundtrip(
    data: Path = typer.Argument(DEFAULT_DATA, help="Dataset folder."),
    resolution: List[int] = typer.Option([64], help="Resolutions to measure (repeatable)."),
    limit: int = typer.Option(175, help="At most this many test meshes."),
) -> None:
    """Print the mesh -> image -> mesh error table on the held-out test meshes."""
    from facegan.geometry_image.files import print_roundtrip

    print_roundtrip(data, resolution, limit, echo=typer.echo)


@app.command()
def demo(
    data: Path = typer.Option(DEFAULT_DATA, help="Where the default dataset lives (made if missing)."),
    out: Path = typer.Option(Path("out/demo-samples"), help="Where samples of the shipped model go."),
) -> None:
    """The main job on the built-in default: synthesize the small dataset, encode it, print the
    round trip, and sample faces from the shipped model (when this installation has one)."""
    from facegan.data.dataset import open_dataset
    from facegan.data.encode import encode_dataset
    from facegan.data.build import synthesize_dataset
    from facegan.geometry_image.files import print_roundtrip
    from facegan.sampling import SHIPPED_MODEL, load, sample_to_files

    if not (data / "dataset.json").exists():
        synthesize_dataset(data, profile="small", seed=0)
    ds = open_dataset(data)
    if not (data / "images" / "res64.json").exists():
        encode_dataset(ds, 64)
    print_roundtrip(data, [64], 175, echo=typer.echo)
    if SHIPPED_MODEL.exists():
        sample_to_files(load(), 4, out, fix="identity", m=4)
        typer.echo(f"sampled 4 identities x 4 expressions from the shipped model into {out}")
    else:
        typer.echo("no shipped model in this installation yet: train one with 'facegan train DATA -o RUN'")


@app.command()
def train(
    data: Path = typer.Argument(..., help="Dataset folder (encoded on first use)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder (config, logs, samples, checkpoints, model)."),
    profile: str = typer.Option("small", help="small (2 CPU cores, <= 2 h) or paper (GPU, the paper's widths)."),
    variant: Optional[str] = typer.Option(None, help="full, acgan, no-alternate, no-tv, no-feature or id-only."),
    epochs: Optional[int] = typer.Option(None, help="Number of epochs (overrides the profile)."),
    config: Optional[Path] = typer.Option(None, help="TOML file of config values."),
    set_: List[str] = typer.Option([], "--set", help="key=value config override (repeatable)."),
    resume: bool = typer.Option(False, help="Continue the run in --out exactly where it stopped."),
    resolution: int = typer.Option(64, help="Geometry image side (64 or 128)."),
) -> None:
    """Train the adversarial face model (works under torchrun for several processes)."""
    from facegan.train.prepare import run_training

    path = run_training(data, out, profile, variant, epochs, config, set_, resume, resolution)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, every process returns here
        typer.echo(f"model written to {path}")


@app.command()
def sample(
    n: int = typer.Option(16, "--n", help="Number of samples (of groups, with --fix)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder."),
    run: Optional[Path] = typer.Option(None, help="Run folder or model file (default: the shipped model)."),
    fix: Optional[str] = typer.Option(None, help="Factor whose code each group of --m samples shares (identity, expression)."),
    m: int = typer.Option(1, "--m", help="Samples per group, with --fix."),
    format: str = typer.Option("obj", "--format", help="obj, ply or npz."),
    seed: int = typer.Option(0, help="Random seed."),
    method: str = typer.Option("dense", help="Reconstruction: dense (Laplacian) or sparse."),
) -> None:
    """Sample faces: meshes, codes.json and a grid.png."""
    from facegan.sampling import load, sample_to_files

    sample_to_files(load(run), n, out, fix, m, format, seed, method)
    typer.echo(f"wrote {out}")


@app.command("export-model")
def export_model(
    checkpoint: Path = typer.Argument(..., help="A run's checkpoint.safetensors."),
    out: Path = typer.Option(..., "--out", "-o", help="Model file to write (G_ema, fixed codes, codec)."),
    code_bank: str = typer.Option("", help=BANK_HELP),
    bandwidth: Optional[str] = typer.Option(None, help=BANDWIDTH_HELP),
) -> None:
    """Write the few-MB sampling model of a training checkpoint (e.g. of a run still going)."""
    from facegan.train.checkpoint import export_model_from_checkpoint

    export_model_from_checkpoint(checkpoint, out, _names(code_bank), _bandwidth(bandwidth))
    typer.echo(f"wrote {out}")


@app.command()
def curves(
    run: Path = typer.Argument(..., help="A training run folder (its log.csv), or a log.csv."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="PNG to write (default: curves.png beside the log)."),
) -> None:
    """Draw a run's training log (losses, accuracies, speed, learning rate) as a PNG, e.g. while it trains."""
    from facegan.train.curves import plot_training_log

    log = run / "log.csv" if run.is_dir() else run
    out = out or log.with_name("curves.png")
    plot_training_log(log, out)
    typer.echo(f"wrote {out}")


def _fit_options(iterations: Optional[int], init: Optional[str], starts: int, **fixed):
    """FitOptions with the options given on the command line, the defaults for the rest."""
    from facegan.fit import FitOptions

    given = {key: value for key, value in (("iterations", iterations), ("init", init)) if value is not None}
    return FitOptions(starts=starts, **given, **fixed)


@app.command()
def fit(
    meshes: List[Path] = typer.Argument(None, help="Registered meshes (OBJ/PLY) to fit."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (fits, codes, errors.csv, PNGs)."),
    run: Optional[Path] = typer.Option(None, help="Run folder or model file (default: the shipped model)."),
    data: Optional[Path] = typer.Option(None, help="Fit a dataset split instead of mesh files."),
    split: str = typer.Option("test", help="The split of --data to fit."),
    limit: Optional[int] = typer.Option(None, help="At most this many meshes of the split."),
    mask: Optional[Path] = typer.Option(None, help="Vertex mask file (.npy bool or .txt indices): fit only these vertices."),
    iterations: Optional[int] = typer.Option(None, help="Adam iterations (default: 300)."),
    seed: int = typer.Option(0, help="Random seed of the starting codes."),
    init: Optional[str] = typer.Option(None, help="First start: zero (the prior's mode; the default) or random (the paper's)."),
    starts: int = typer.Option(1, help="Starts per face, the best kept (for fits stuck in a poorer minimum)."),
    share: List[str] = typer.Option([], help="Factor whose code is shared (repeatable): with --data, by the "
                                             "meshes with one label; else by all the meshes (scans of one person)."),
) -> None:
    """Find latent codes for registered faces (Eq. 12); writes fitted meshes, codes and errors in mm."""
    from facegan.fit import fit_files, fit_split
    from facegan.sampling import load

    options = _fit_options(iterations, init, starts, seed=seed, dense=True)
    if data is not None:
        result = fit_split(data, split, out, load(run), limit=limit, vertex_mask=mask, options=options, share=share)
    elif meshes:
        result = fit_files(meshes, out, load(run), vertex_mask=mask, options=options, share=share)
    else:
        raise FaceganError("give mesh files to fit, or --data DATA [--split test]")
    typer.echo(f"fitted {len(result.mean_error)} meshes: mean error {float(result.mean_error.mean()):.3f} mm; wrote {out}")


@app.command()
def edit(
    operation: str = typer.Argument(..., help="transfer, add or interpolate."),
    source: List[Path] = typer.Option(..., "--source", help="Codes file (.json/.npz) or meshes (fitted first)."),
    target: List[Path] = typer.Option(..., "--target", help="Codes file or meshes."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder."),
    run: Optional[Path] = typer.Option(None, help="Run folder or model file (default: the shipped model)."),
    factor: Optional[str] = typer.Option(None, help="Factor to edit (transfer/add: expression; interpolate: identity)."),
    steps: int = typer.Option(7, help="Interpolation steps."),
    keep_detail: bool = typer.Option(False, "--keep-detail", help="transfer/add: apply the edit to the target "
                                     "meshes themselves, keeping what the fit missed."),
) -> None:
    """Edit faces in latent space: expression transfer/add (Fig. 9) or interpolation (Fig. 10)."""
    from facegan.fit import edit_files, interpolate_files
    from facegan.sampling import load

    src = source[0] if len(source) == 1 else list(source)
    tgt = target[0] if len(target) == 1 else list(target)
    if operation in ("transfer", "add"):
        edit_files(out, load(run), src, tgt, operations=(operation,), factor=factor or "expression", detail=keep_detail)
    elif operation == "interpolate":
        if keep_detail:
            raise FaceganError("--keep-detail is for transfer and add; an interpolation ends at face b, not a")
        interpolate_files(out, load(run), src, tgt, factor=factor or "identity", steps=steps)
    else:
        raise FaceganError(f"unknown edit operation '{operation}' (use transfer, add or interpolate)")
    typer.echo(f"wrote {out}")


@app.command()
def explore(
    run: Optional[Path] = typer.Option(None, help="Run folder or model file (default: the shipped model)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on; other than loopback, anyone who can "
                             "reach this machine can use the page."),
    port: int = typer.Option(8765, help="Port (0: any free port)."),
    max_upload_mb: float = typer.Option(20.0, help="Largest mesh upload accepted, in MB (10^6 bytes)."),
    browser: bool = typer.Option(True, "--browser/--no-browser", help="Open the page in a web browser."),
) -> None:
    """Serve an interactive page to look at, draw, edit and fit faces (docs/explore.md)."""
    from facegan.explore.server import serve

    serve(run, host, port, int(max_upload_mb * 1e6), open_browser=browser, echo=typer.echo)


@app.command()
def baseline(
    kind: str = typer.Argument(..., help="linear, tucker or autoencoder."),
    data: Path = typer.Option(DEFAULT_DATA, "--data", help="Dataset folder (trained on its train split)."),
    out: Path = typer.Option(..., "--out", "-o", help="Model file to write (.safetensors)."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Train a baseline face model (docs/baselines.md); evaluate it with `facegan evaluate --run FILE`."""
    from facegan.baselines import BaselineOptions, save_baseline, train_baseline
    from facegan.data.dataset import open_dataset

    save_baseline(train_baseline(kind, open_dataset(data), BaselineOptions(seed=seed), _progress()), out)
    typer.echo(f"wrote {out}")


@app.command()
def evaluate(
    data: Path = typer.Option(DEFAULT_DATA, "--data", help="Dataset folder (its train and test splits)."),
    out: Path = typer.Option(..., "--out", "-o", help="Report folder (report.md, report.json, figures/)."),
    run: List[Path] = typer.Option([], "--run", help="Model: run folder, model file or baseline file (repeatable; "
                                   "default: the shipped model)."),
    name: List[str] = typer.Option([], "--name", help="Report label of each --run (repeatable, same order)."),
    real: bool = typer.Option(True, help="Add the held-out real-data reference row."),
    metrics: str = typer.Option("all", help="Comma-separated metric groups: generalization, specificity, diversity, "
                                "decoupling, oracle, distribution, roughness (default all)."),
    judges: str = typer.Option("small", help="Embedding judges for decoupling/KID: small, paper or none."),
    samples: int = typer.Option(1000, help="Samples for specificity and roughness (paper: 1000)."),
    groups: int = typer.Option(100, help="Decoupling anchors n (paper: 100)."),
    group_size: int = typer.Option(100, help="Faces per anchor m (paper: 100)."),
    pairs: int = typer.Option(10000, help="Diversity pairs (paper: 10,000)."),
    limit: int = typer.Option(0, help="Test meshes fitted for generalization (0 = all)."),
    seed: int = typer.Option(0, help="Seed of every random draw."),
    fit_iterations: Optional[int] = typer.Option(None, help="GAN fits: Adam iterations (default: 300)."),
    fit_init: Optional[str] = typer.Option(None, help="GAN fits: first start, zero (default) or random."),
    fit_starts: int = typer.Option(1, help="GAN fits: starts per face, the best kept."),
) -> None:
    """Table-1 metrics of trained models and baselines against a dataset, with the real-data row."""
    from facegan.evaluation.evaluate import METRIC_GROUPS, EvalConfig
    from facegan.evaluation.experiment import evaluate_models

    chosen = METRIC_GROUPS if metrics == "all" else tuple(_names(metrics))
    config = EvalConfig(specificity_samples=samples, diversity_pairs=pairs, decoupling_groups=groups,
                        decoupling_group_size=group_size, generalization_limit=limit, judges=judges, metrics=chosen,
                        seed=seed)
    path = evaluate_models(data, out, list(run) or [None], name, config, real, _progress(),
                           fit_options=_fit_options(fit_iterations, fit_init, fit_starts))
    typer.echo(f"wrote {path}")


@app.command()
def diagnose(
    run: Path = typer.Option(..., "--run", help="A training checkpoint (RUN/checkpoint.safetensors: it holds D)."),
    data: Path = typer.Option(DEFAULT_DATA, "--data", help="The dataset the run was trained on."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for diagnosis.md and diagnosis.json."),
    pairs: int = typer.Option(2000, help="Pairs per kind for the feature floors."),
    groups: int = typer.Option(40, help="Groups per code for the code effects."),
    group_size: int = typer.Option(40, help="Samples per group."),
    seed: int = typer.Option(0, help="Seed of every random draw."),
    code_bank: str = typer.Option("", help=BANK_HELP),
    bandwidth: Optional[str] = typer.Option(None, help=BANDWIDTH_HELP),
) -> None:
    """Why codes are (not) decoupled: what each code moves, and the feature loss on real and generated pairs."""
    from facegan.evaluation.diagnose import diagnose as run_diagnosis

    path = run_diagnosis(run, data, out, pairs, groups, group_size, seed, _names(code_bank), _bandwidth(bandwidth))
    typer.echo(path.read_text(), nl=False)


experiment_app = typer.Typer(no_args_is_help=True, help="Experiments that train and evaluate several models.")
app.add_typer(experiment_app, name="experiment")


@experiment_app.command("table1")
def experiment_table1(
    data: Path = typer.Option(DEFAULT_DATA, "--data", help="Dataset folder."),
    out: Path = typer.Option(Path("docs/results"), "--out", "-o", help="Report folder (table1.md, table1.json, figures/)."),
    profile: str = typer.Option("small", help="small (2 CPU cores, hours) or paper (GPU)."),
    runs: Path = typer.Option(Path("runs/table1"), help="Runs, baselines, judges and cached evaluations (resumable)."),
    model: List[str] = typer.Option([], "--model", help="Only these rows (repeatable): full, acgan, no-alternate, "
                                    "no-tv, no-feature, id-only, linear, tucker, autoencoder."),
) -> None:
    """Reproduce the paper's Table 1: train the variants and baselines, evaluate all, write the report."""
    from facegan.evaluation.experiment import table1

    path = table1(data, out, profile, runs, list(model) or None, _progress())
    typer.echo(f"wrote {path}")


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main() -> None:
    """Entry point: user errors become one line on stderr and exit status 1, never a traceback; warnings
    are one line too."""
    warnings.formatwarning = _one_line_warning
    try:
        app(standalone_mode=False)
    except FaceganError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        sys.exit(130)
    except __import__("click").exceptions.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
