"""A run stops cleanly, with one line naming the cause, when a rank dies or the launcher is told to stop.

* :func:`handle_signals` turns SIGTERM and SIGINT (Ctrl-C) into the :class:`Terminated` exception (so ``with``
  blocks such as the atomic output directory clean up; the launcher sends SIGTERM to every rank when it is stopped
  or when one rank fails, and passes a SIGINT on to every rank).
* :func:`stop_quietly_while_starting`: before that, while the libraries load, Ctrl-C ends the process with the same
  one line and status.
* :func:`install` (collective, once per run after the process group exists) exchanges every rank's (host, PID),
  handles the signals and, at world size > 1, starts a daemon thread that polls the other ranks on this host: if
  one has ended and this rank is still running ``grace`` seconds later (stuck in a collective whose transport did
  not notice), it prints the lost rank, removes this rank's temporary output directory and exits with status 1.
* :func:`describe` turns an exception into the one-line message the user sees: a collective that failed because a
  peer died names that rank (``lost rank 1 (process 4242 ended) during gradients 2``); a collective that timed
  out names ``timeout_seconds``.
* :func:`wait_for_rank0`: a rank other than 0 that failed gives rank 0 a moment to fail in turn and say why, so
  that bad input every rank sees is reported as itself, not as the lost rank that met it first.

Ranks on other hosts cannot be polled; there the gloo/NCCL connection error or the process group timeout
(``timeout_seconds``) bounds the wait. A rank that is alive but stuck is bounded by the timeout only.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from launch import faults

_peers: list[tuple[str, int]] = []
_timeout = 0
_stopping = False  # set once the run is failing: a signal then no longer interrupts the error report
_stopped_by_launcher = False  # a signal came while _stopping: the launcher is ending the run (another rank ended)
_CONNECTION = ("connection closed", "connection reset", "broken pipe", "connection refused", "econnreset")
_TIMEOUT = ("timed out",)


class Terminated(BaseException):  # noqa: N818 - like KeyboardInterrupt: not caught by ``except Exception``
    """The signal ``signum`` arrived: SIGTERM (the launcher was stopped, or another rank failed) or SIGINT
    (Ctrl-C)."""

    def __init__(self, signum: int = signal.SIGTERM):
        self.signum = signal.Signals(signum)
        super().__init__(f"terminated by {self.signum.name}")


_lost_at_signal: list[int] = []  # ranks already ended when the signal arrived: the launcher's reason for it


def _on_signal(signum, frame):
    signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once
    # the launcher stops every rank once one has failed; a killed rank that this rank had not yet noticed (no
    # collective since) is then the cause, not the signal. Taken at once: the launcher signals rank 0 first, so
    # on a plain stop the other ranks are still alive here.
    global _stopped_by_launcher
    _lost_at_signal[:] = lost_ranks()
    if not _stopping:
        raise Terminated(signum)
    _stopped_by_launcher = True


_replaced: dict[int, object] = {}  # the handlers handle_signals replaced, by signal


def stop_quietly_while_starting() -> None:
    """Before the libraries load (torch takes seconds): Ctrl-C then ends the process with one line and status 130,
    not an import traceback, until :func:`handle_signals` takes over. An ignored SIGINT stays ignored."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _exit_while_starting)


def _exit_while_starting(signum, frame):
    signal.signal(signum, signal.SIG_DFL)
    if os.environ.get("RANK", "0") == "0":  # every rank gets the launcher's Ctrl-C: rank 0 says it
        print(f"error: terminated by {signal.Signals(signum).name} during start; stopped without writing output",
              file=sys.stderr, flush=True)
    sys.exit(128 + signum)


def handle_signals() -> None:
    """Raise :class:`Terminated` on SIGTERM and SIGINT (from the main thread only) until :func:`restore_signals`.
    A SIGINT ignored when the process started (a background job of a script) stays ignored, as Python leaves it."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGINT):
        old = signal.getsignal(signum)
        if old is _on_signal or (signum == signal.SIGINT and old is signal.SIG_IGN):
            continue
        _replaced[signum] = old
        signal.signal(signum, _on_signal)


def restore_signals() -> None:
    """Put back the handlers :func:`handle_signals` replaced (the run is over)."""
    if threading.current_thread() is not threading.main_thread():
        return
    while _replaced:
        signum, old = _replaced.popitem()
        if old is not None:  # None: a handler not set from Python, which cannot be put back
            signal.signal(signum, old)


def install(timeout_seconds: int, output_dir: str | os.PathLike | None = None, grace: float = 15.0) -> None:
    """Collective: record the ranks' (host, PID), handle SIGTERM and SIGINT (:func:`handle_signals`), start the
    watchdog thread at world size > 1."""
    from dist_chita.distributed import comm

    global _timeout, _stopping, _stopped_by_launcher
    _timeout, _stopping, _stopped_by_launcher = timeout_seconds, False, False
    _lost_at_signal.clear()
    handle_signals()
    _peers[:] = [tuple(x) for x in comm.all_gather_object((socket.gethostname(), os.getpid()))]
    if len(_peers) > 1:
        threading.Thread(target=_watch, args=(grace, output_dir), name="dist-chita-watchdog", daemon=True).start()


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def lost_ranks(peers: list[tuple[str, int]] | None = None) -> list[int]:
    """Ranks on this host whose process has ended (gone or a zombie), in rank order."""
    host = socket.gethostname()
    peers = _peers if peers is None else peers
    return [r for r, (h, pid) in enumerate(peers) if h == host and pid != os.getpid() and not _alive(pid)]


def _lost_line(lost: list[int]) -> str:
    who = ", ".join(f"rank {r} (process {_peers[r][1]} ended)" for r in lost)
    return f"lost {who} during {faults.current_phase()}"


def is_comm_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed (a peer ended or did not answer), not an error of its own."""
    low = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(k in low for k in _CONNECTION + _TIMEOUT)


def should_print(rank: int, exc: BaseException | None = None) -> bool:
    """Rank 0 prints. Another rank prints only when its collective failed because rank 0 (and every rank below it)
    is lost: an error of its own (bad input every rank meets) is rank 0's to report, even when rank 0 has ended
    by the time this rank looks (it ended after saying so), and a SIGTERM means the launcher is stopping the run
    after another rank failed."""
    if rank == 0:
        return True
    if exc is None or isinstance(exc, Terminated) or not is_comm_error(exc):
        return False
    lost = set(lost_ranks())
    return 0 in lost and all(r in lost for r in range(rank))


def record_for_launcher(message: str) -> None:
    """Write ``message`` into torchelastic's error file (``TORCHELASTIC_ERROR_FILE``, set by ``torchrun`` and
    ``accelerate launch`` for each rank), so that the launcher's failure summary names the cause instead of
    ``error_file: <N/A>``. Nothing without the variable."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    import json

    data = {"message": {"message": message, "extraInfo": {"py_callstack": message + "\n",
                                                           "timestamp": str(int(time.time()))}}}
    try:
        Path(path).write_text(json.dumps(data))
    except OSError:
        pass


def wait_for_rank0(grace: float = 5.0, poll: float = 0.05) -> bool:
    """On a rank other than 0 that failed and does not print (:func:`should_print`): give rank 0 up to ``grace``
    seconds to end (on this host), so that an error every rank meets (bad input) is reported by rank 0 as itself.
    Otherwise this rank could end first, the launcher would stop rank 0 and rank 0 would report this rank as lost.
    A SIGTERM no longer interrupts (the run is failing) but ends the wait: the launcher stops the run because a
    rank ended (rank 0 on another host, say), and that rank reports. Returns whether rank 0 ended (or the launcher
    stopped this rank); False where neither happened within ``grace`` (rank 0 on another host and alive, or
    before :func:`install`)."""
    global _stopping
    _stopping = True
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if _stopped_by_launcher or (_peers and 0 in lost_ranks()):
            return True
        time.sleep(poll)
    return False


def remove_dead_temporaries(output_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary directories (``.<name>.tmp-<pid>``) that killed runs left beside ``output_dir``,
    those whose process no longer runs on this host; returns them."""
    out = Path(output_dir).expanduser().resolve()
    removed = []
    for p in out.parent.glob(f".{out.name}.tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _watch(grace: float, output_dir) -> None:
    from dist_chita.distributed import comm

    since: float | None = None
    while True:
        time.sleep(1.0)
        lost = lost_ranks()
        if not lost:
            since = None
            continue
        since = since or time.monotonic()
        if time.monotonic() - since < grace:
            continue
        if should_print(comm.rank()):
            line = f"error: {_lost_line(lost)}; rank {comm.rank()} is stopping (no output written)"
            print(line, file=sys.stderr, flush=True)
            record_for_launcher(line)
        if output_dir is not None:
            out = Path(output_dir).expanduser().resolve()
            shutil.rmtree(out.parent / f".{out.name}.tmp-{os.getpid()}", ignore_errors=True)
        os._exit(1)


def describe(exc: BaseException) -> str:
    """The one-line message for ``exc`` (without the ``error:`` prefix)."""
    global _stopping
    _stopping = True
    exc = _terminated(exc) or exc
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    low = text.lower()
    if isinstance(exc, Terminated) or is_comm_error(exc):
        if isinstance(exc, Terminated):  # the launcher stops every rank: the cause is a lost rank, or the signal
            if _lost_at_signal:
                return f"{_lost_line(_lost_at_signal)}; stopped without writing output"
            return f"terminated by {exc.signum.name} during {faults.current_phase()}; stopped without writing output"
        for _ in range(20):  # a killed peer's sockets close a moment before it is a zombie
            lost = lost_ranks()
            if lost or not _peers:
                break
            time.sleep(0.1)
        if lost:
            return f"{_lost_line(lost)}; stopped without writing output"
        if any(k in low for k in _TIMEOUT):
            return (f"no answer from another rank within timeout_seconds = {_timeout} during "
                    f"{faults.current_phase()} (a rank is stuck or unreachable); stopped without writing output")
        return f"lost contact with another rank during {faults.current_phase()} ({first})"
    return first


def _terminated(exc: BaseException) -> Terminated | None:
    """The :class:`Terminated` that ``exc`` is or followed from (a collective that failed while stopping), if any."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, Terminated):
        cause = cause.__cause__ or cause.__context__
    return cause


def exit_status(exc: BaseException) -> int:
    """The exit status of a run that ``exc`` stopped: 128 + the signal's number when a signal stopped it (as a shell
    reports a process that signal ended: 130 for Ctrl-C, 143 for SIGTERM); 1 for an error, or a lost rank that the
    launcher's signal followed (:func:`describe` names it)."""
    stop = _terminated(exc)
    return 128 + stop.signum if stop is not None and not _lost_at_signal else 1
