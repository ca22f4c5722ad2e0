"""User-facing errors: the command line prints them as one line and exits non-zero."""


class FaceganError(Exception):
    """A problem with the user's input (a file, an option, a dataset), stated in one line.

    Messages name the file or option and the problem, e.g.
    ``"faces/017.obj: 5023 vertices, the template has 6706"``.
    """
