"""The one path-safety check: a name from outside (an archive member, a manifest's image_id, a
dataset name) that becomes a path under a folder must not leave that folder."""
from __future__ import annotations


def parts(name: str) -> list[str]:
    return name.replace("\\", "/").split("/")


def escapes(name: str) -> str | None:
    """Why joining ``name`` to a folder could leave that folder, or None when it cannot."""
    if not name:
        return "empty name"
    if "\x00" in name:
        return "a NUL byte in its name"
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if ".." in parts(name):
        return "'..' in its path"
    return None


def check_name(name: str, what: str) -> str:
    """A single plain folder name (a dataset, a feature set), else ValueError saying why."""
    why = escapes(name) or ("not a single folder name" if len(parts(name)) > 1 or name.startswith(".") else None)
    if why:
        raise ValueError(f"{what} {name!r} is not usable as a folder name ({why})")
    return name
