"""``facegan explore``: a local web page to look at, edit and fit faces of a trained model.

- :mod:`facegan.explore.session`: the model state (faces by id, drawing, editing, fitting, exports),
  plain Python, no HTTP;
- :mod:`facegan.explore.server`: the stdlib HTTP server, its routes and :func:`serve`;
- ``static/``: the page (built from ``web/``). See docs/explore.md.
"""
