"""Fault injection for the reliability tests (inactive unless ``DIST_CHITA_FAULT`` is set).

``DIST_CHITA_FAULT="<rank>:<phase>"`` makes that rank stall when it reaches ``phase``: a progress phase of the
pipeline (``"gradients 3"``: after its first micro-batch of stage 3's per-sample gradients, ``"solver 1"``: after
the first IHT step of stage 1) or ``"save"`` (rank 0, inside the temporary output directory, before the report is
written). The stalled rank writes its PID to the file ``DIST_CHITA_FAULT_FILE`` (atomically) and sleeps, so a test
can kill it (SIGKILL) or the launcher (SIGTERM) at a known point. :func:`current_phase` is the last phase any
progress callback reported, for error messages.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

_phase = "start"


def current_phase() -> str:
    return _phase


def point(phase: str, stall: bool = True) -> None:
    """Record ``phase``; stall here if ``DIST_CHITA_FAULT`` names this rank and phase (and ``stall``: a phase
    entered here whose fault point comes later)."""
    global _phase
    _phase = phase
    spec = os.environ.get("DIST_CHITA_FAULT")
    if not spec or not stall:
        return
    from dist_chita.distributed import comm

    if spec != f"{comm.rank()}:{phase}":
        return
    target = os.environ.get("DIST_CHITA_FAULT_FILE")
    if target:
        tmp = Path(f"{target}.tmp-{os.getpid()}")
        tmp.write_text(f"{os.getpid()} {phase}\n")
        os.replace(tmp, target)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:  # stalled (alive, not in a collective) until killed
        time.sleep(0.2)


def watch(progress: Callable[[str, int, int], None] | None) -> Callable[[str, int, int], None]:
    """Wrap a ``progress(phase, done, total)`` callback so every phase passes through :func:`point`."""

    def wrapped(phase: str, done: int, total: int) -> None:
        point(phase)
        if progress is not None:
            progress(phase, done, total)

    return wrapped
