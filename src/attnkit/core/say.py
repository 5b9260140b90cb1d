"""What library code tells its user while it works (a model converted, progress lines off a terminal,
a study's steps): lines on one `attnkit` logger, so that the program using the library decides where
they go. The command line shows them on stderr (`show()`, called by the app before any command); a
script or notebook sees them once it configures logging, or after `show()`. Library modules never print.
"""

from __future__ import annotations

import logging
import sys

LOGGER = logging.getLogger("attnkit")


def say(text: str) -> None:
    LOGGER.info(text)


class _Stderr(logging.Handler):
    """Writes each line to the sys.stderr of the moment (a test runner may swap it per call)."""

    attnkit = True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stderr, flush=True)
        except Exception:  # a closed stream must not end the work
            self.handleError(record)


def show() -> None:
    """Print attnkit's lines (INFO and up) on stderr, the message alone; idempotent."""
    if not any(getattr(h, "attnkit", False) for h in LOGGER.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False
