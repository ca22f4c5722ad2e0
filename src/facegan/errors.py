"""User-facing errors: the command line prints them as one line and exits non-zero."""


class FaceganError(Exception):
    """A problem with the user's input (a file, an option, a dataset), stated in one line.

    Messages name the file or option and the problem, e.g.
    ``"faces/017.obj: 5023 vertices, the template has 6706"``.
    """


def check_known(values, known, what: str, where: str | None = None) -> None:
    """Raise :class:`FaceganError` naming the first of ``values`` not in ``known`` (any container of names):
    ``"[where: ]unknown {what} 'x' (known: a, b, c)"``."""
    for value in values:
        if value not in known:
            prefix = f"{where}: " if where else ""
            raise FaceganError(f"{prefix}unknown {what} {value!r} (known: {', '.join(map(str, known))})")


def lookup(table, key, what: str, where: str | None = None):
    """``table[key]``, or the :func:`check_known` error for an unknown key."""
    check_known([key], table, what, where)
    return table[key]
