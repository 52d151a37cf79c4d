"""The extra's check: importing sparsemup.hf without transformers is an error naming ``sparsemup[hf]``."""

from __future__ import annotations

import importlib.util

__all__ = ["MissingExtraError", "require_transformers"]


class MissingExtraError(ImportError, ValueError):
    """transformers is not installed (a ValueError too, so the CLI reports it as bad input, exit 2)."""


def require_transformers() -> None:
    """Raise ``MissingExtraError`` unless transformers can be imported."""
    try:
        missing = importlib.util.find_spec("transformers") is None
    except ValueError:  # a stubbed-out sys.modules entry (None) has no spec
        missing = True
    if missing:
        raise MissingExtraError(
            "sparsemup.hf needs Hugging Face transformers, which is not installed: pip install 'sparsemup[hf]'"
        )


require_transformers()
