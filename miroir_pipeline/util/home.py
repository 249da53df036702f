"""Where the embedded defaults live, in a module light enough for a command's first steps."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_home"]


def default_home() -> Path:
    """Where the embedded defaults live (jobs database, local node stores, Dagster home, staging):
    ``$MIROIR_HOME``, else ``./.miroir``. Read when asked, never at import."""
    return Path(os.environ.get("MIROIR_HOME", ".miroir"))
