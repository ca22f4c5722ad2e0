"""facegan: generative 3D face models by adversarial training."""

__version__ = "0.1.0"
