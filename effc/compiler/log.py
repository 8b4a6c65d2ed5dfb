"""effc's logger: `logging.getLogger("effc")`.

Warnings say when effc silently does less than asked (a filter that matches nothing, a
calibration that serves no site, a graph compiled with grad on, a pass that rewrote nothing);
info lines say what each pass did. Each compiled graph logs its warnings once, also when it
is re-derived after a weight change. `EFFC_LOG_LEVEL` (DEBUG, INFO, WARNING, ERROR) sets the
level and, if the logger has no handler yet, adds one that prints to stderr.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("effc")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def configure_from_env(env: dict[str, str] | None = None) -> None:
    """Apply EFFC_LOG_LEVEL (a ValueError names the accepted levels)."""
    raw = (os.environ if env is None else env).get("EFFC_LOG_LEVEL")
    if not raw:
        return
    level = raw.strip().upper()
    if level not in LEVELS:
        raise ValueError(f"effc environment variable EFFC_LOG_LEVEL: expected one of "
                         f"{', '.join(LEVELS)}, got {raw!r}")
    logger.setLevel(level)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))
        logger.addHandler(handler)
