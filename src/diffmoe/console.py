"""The one place the library talks to a terminal: progress bars and status lines.

Library code calls :func:`progress` and :func:`say`; both are silent when disabled (tests, workers of
rank > 0), so nothing else in the library prints.
"""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress(total: int, desc: str, enabled: bool = True, initial: int = 0) -> tqdm:
    """A progress bar on stderr (a disabled bar still accepts update / set_postfix calls)."""
    return tqdm(
        total=total, desc=desc, initial=initial, disable=not enabled, dynamic_ncols=True, file=sys.stderr, leave=True
    )


def say(message: str, enabled: bool = True) -> None:
    """A status line, written so that it does not break an active progress bar."""
    if enabled:
        tqdm.write(message, file=sys.stdout)
