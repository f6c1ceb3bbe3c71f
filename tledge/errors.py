"""The one exception type for problems a user can fix; the CLI turns it into a one-line message and exit 1."""


class TledgeError(Exception):
    """A user error: bad input, a missing dependency, a failed check. The message says what to do."""


class GateFailed(TledgeError):
    """A release gate found a regression beyond its thresholds (its own exit code, so CI can tell it apart)."""


def require(module: str, install: str):
    """Import an optional heavy module, or fail with the command that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise TledgeError(f"{module} is needed for this step but is not importable ({exc}). Install it: {install}") from exc
