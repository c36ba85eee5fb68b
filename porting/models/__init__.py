"""Net definitions the project ships: ``path("caffenet")`` -> the prototxt's path."""
from pathlib import Path

HERE = Path(__file__).resolve().parent


def path(name: str) -> Path:
    """Path of a shipped prototxt by short name (e.g. "caffenet")."""
    found = HERE / f"{name}.prototxt"
    if not found.exists():
        raise FileNotFoundError(f"no shipped model named {name!r}; have: {', '.join(available())}")
    return found


def available() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.prototxt"))


# Published weights the shipped nets accept (not downloadable on every machine: pass
# the path). sha1 from the model's readme in the Caffe model zoo.
KNOWN_WEIGHTS = {
    "caffenet": {
        "file": "bvlc_reference_caffenet.caffemodel",
        "url": "http://dl.caffe.berkeleyvision.org/bvlc_reference_caffenet.caffemodel",
        "sha1": "4c8d77deb20ea792f84eb5e6d0a11ca0a8660a46",
    },
}


def sha1_of(path: str | Path) -> str:
    """The SHA-1 the model zoo publishes for a file."""
    from porting.files import file_digest

    return file_digest(path, "sha1")


def check_weights(name: str, path: str | Path) -> None:
    """Raise PortingError unless ``path`` is the published weights file ``name`` (by SHA-1)."""
    from porting.errors import PortingError

    known = KNOWN_WEIGHTS[name]
    got = sha1_of(path)
    if got != known["sha1"]:
        raise PortingError(f"SHA-1 {got} is not that of {known['file']} ({known['sha1']}); "
                           f"download it again from {known['url']}", path)
