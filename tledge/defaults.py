"""The default of a dataclass field, so that the CLI and the build state the stage configs' defaults instead of copies."""

from __future__ import annotations

import dataclasses


def default(cls: type, name: str):
    """The default of field ``name`` of dataclass ``cls`` (so the CLI states the library's defaults, not copies)."""
    f = cls.__dataclass_fields__[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    raise KeyError(f"{cls.__name__}.{name} has no default")
