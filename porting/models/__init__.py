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
