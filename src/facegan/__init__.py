"""facegan: generative 3D face models by adversarial training."""

__version__ = "0.1.0"


def load(run=None, device=None):
    """A trained :class:`facegan.model.FaceModel` from a run folder, or the shipped model (see
    :func:`facegan.sampling.load`)."""
    from facegan.sampling import load as _load

    return _load(run, device)
