"""Opening data files: a clear error when one is missing, .gz read transparently."""

from __future__ import annotations

import gzip
from pathlib import Path

from attnkit.errors import AttnkitError


def open_text(path: str | Path, what: str = "data file"):
    """The file as text lines (gzip-compressed when it ends in .gz); a missing file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise AttnkitError(f"{what} not found: {path}")
    return gzip.open(path, "rt") if path.suffix == ".gz" else open(path)
