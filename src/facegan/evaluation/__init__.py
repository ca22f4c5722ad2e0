"""Evaluating face models the paper's way (Table 1) and beyond: one interface, every metric, reports."""

from facegan.evaluation.generators import FaceGenerator, GanGenerator, load_generator, register_loader

__all__ = ["FaceGenerator", "GanGenerator", "load_generator", "register_loader"]
