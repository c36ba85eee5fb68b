"""Errors the harness reports to a person: one line naming the file, the place and the problem."""


class PortingError(Exception):
    """Bad input (a file, a net, a weight blob). The CLI prints ``str(err)`` and exits 2."""

    def __init__(self, problem: str, path: object = None, place: str | None = None):
        self.path, self.place, self.problem = path, place, problem
        parts = [str(p) for p in (path, place) if p]
        super().__init__(": ".join(parts + [problem]))


class UnsupportedLayers(PortingError):
    """The net uses layer types the port does not implement (listed all at once)."""
