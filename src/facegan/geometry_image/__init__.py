"""Geometry images (Section 3): the pixel map of a template, encoding, quantization, reconstruction."""

from facegan.geometry_image.codec import DEFAULT_ALPHA, PAPER_ALPHA, GeometryImageCodec
from facegan.geometry_image.pixel_map import PixelMap, build_pixel_map, uv_to_pixels
from facegan.geometry_image.reconstruct import DenseReconstructor, bilinear_matrix, bilinear_read

__all__ = [
    "DEFAULT_ALPHA",
    "PAPER_ALPHA",
    "GeometryImageCodec",
    "PixelMap",
    "build_pixel_map",
    "uv_to_pixels",
    "DenseReconstructor",
    "bilinear_matrix",
    "bilinear_read",
]
