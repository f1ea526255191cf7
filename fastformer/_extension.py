"""Loading fastformer._C, the compiled extension that defines the op schemas and CPU kernels.

fastformer imports without it; the ops that need it raise ExtensionNotBuiltError, which
says how to build it.
"""

from __future__ import annotations

import importlib

BUILD_HINT = (
    "build it from the repository root with `make setup`, or inside your environment with "
    "`pip install --no-build-isolation -e .` (FASTFORMER_SKIP_EXTENSION must be unset)"
)


class ExtensionNotBuiltError(RuntimeError):
    """An op needs fastformer._C and it is not built or failed to load."""


def _load() -> tuple[bool, str | None]:
    try:
        importlib.import_module("fastformer._C")
    except ImportError as error:  # not built, or built against another torch
        return False, f"{type(error).__name__}: {error}"
    return True, None


available, load_error = _load()


def require(op: str) -> None:
    """Raise a clear error when `op` is called and the extension is missing."""
    if not available:
        raise ExtensionNotBuiltError(
            f"fastformer.{op} needs the compiled extension fastformer._C, which could not be "
            f"loaded ({load_error}); {BUILD_HINT}."
        )
