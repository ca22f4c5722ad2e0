"""Mesh geometry: the template (topology + UV chart), mesh files, and differential operators."""

from facegan.mesh.template import Template, load_template
from facegan.mesh.io import read_mesh_vertices, write_mesh, read_obj
from facegan.mesh.operators import cotangent_laplacian, triangle_areas, uv_signed_areas

__all__ = [
    "Template",
    "load_template",
    "read_mesh_vertices",
    "read_obj",
    "write_mesh",
    "cotangent_laplacian",
    "triangle_areas",
    "uv_signed_areas",
]
