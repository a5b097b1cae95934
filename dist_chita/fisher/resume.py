"""Stage checkpoints of CHITA++: a long run that dies continues after its last complete stage.

After each stage t of CHITA++ (:func:`dist_chita.fisher.driver.prune` calls ``on_stage_end``) the state that the
remaining stages depend on is written, atomically, into a state directory (by default ``<output.dir>.state``
beside the output): the full pruned weights w_t (p,) float32, the support S_t (p,) bool (the coordinates stage t+1
may keep), the number of completed stages, the stage reports, the settings that determine the result (config
sections and the prunable layers' names and shapes) and the world size.

The full vectors are gathered to rank 0 (the pipeline gathers w once per stage anyway), so the saved state does not
depend on the column blocks: a resume on another world size re-slices w and S with its own layout. Only rank 0
reads and writes the state file; :meth:`StageCheckpoint.load` broadcasts what it read, so ranks on other hosts need
no shared filesystem.

``resume=True`` restores the last complete stage, and the remaining stages run exactly as in an uninterrupted run
(same weights w_bar_t, same support, same calibration samples and seeds), so the final masks are bit-identical.
Saved state made with different settings is refused with a one-line :class:`ResumeError` naming what differs.

Optionally (:meth:`StageCheckpoint.save_factor`) every rank also saves its block A_r^T (p_r, n) of the Fisher
factor after the per-sample gradient phase; a run stopped in that stage's solver then resumes without recomputing
it (only on the same world size; otherwise the factor is recomputed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dist_chita.distributed import comm

VERSION = 1
STATE_FILE = "state.pt"


class ResumeError(ValueError):
    """Saved state that cannot be continued (different settings, unreadable file); the message is one line."""


def state_dir_for(output_dir: str | os.PathLike) -> Path:
    """The default state directory of a run: ``<output_dir>.state`` beside the output directory."""
    out = Path(output_dir).resolve()
    return out.with_name(out.name + ".state")


def fingerprint(settings: dict) -> str:
    """sha256 of the canonical JSON of ``settings`` (what determines the result)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def _flatten(d, prefix: str = "") -> dict:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def differences(saved: dict, current: dict, limit: int = 3) -> str:
    """``"prune.sparsity: 0.8 -> 0.9, solver.seed: 0 -> 1"``: the first ``limit`` differing dotted keys."""
    a, b = _flatten(json.loads(json.dumps(saved, default=str))), _flatten(json.loads(json.dumps(current, default=str)))
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k, "<unset>") != b.get(k, "<unset>")]
    parts = [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"and {len(keys) - limit} more")
    return ", ".join(parts)


@dataclass
class SavedStages:
    """The state after ``stages_done`` complete stages: full w (p,) float32 and support S (p,) bool."""

    stages_done: int
    weights: torch.Tensor
    support: torch.Tensor
    reports: list[dict] = field(default_factory=list)
    world_size: int = 1


def _gather_full(local: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's 1-D ``local`` (uneven lengths allowed) in rank order, on every rank."""
    sizes = [int(s) for s in comm.all_gather_object(int(local.numel()))]
    if len(sizes) == 1:
        return local.clone()
    padded = torch.zeros(max(sizes), dtype=local.dtype, device=local.device)
    padded[: local.numel()] = local
    return torch.cat([part[:s] for part, s in zip(comm.all_gather(padded), sizes, strict=True)])


def _atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class StageCheckpoint:
    """Save CHITA++'s state after each stage and restore the last complete one. Collective methods.

    Args:
        directory: the state directory (created on the first save).
        settings: JSON-able dict of everything that determines the result (config sections, layer names and
            shapes); a saved state is continued only when its settings are equal.
    """

    def __init__(self, directory: str | os.PathLike, settings: dict):
        self.directory = Path(directory)
        self.settings = json.loads(json.dumps(settings, default=str))
        self.key = fingerprint(self.settings)

    @property
    def path(self) -> Path:
        return self.directory / STATE_FILE

    def load(self) -> SavedStages | None:
        """The saved state (None when there is none), on every rank; raises ResumeError if it does not match."""
        reply: tuple[str, object] = ("none", None)
        if comm.is_main() and self.path.exists():
            try:
                state = torch.load(self.path, map_location="cpu", weights_only=True)
                if state.get("version") != VERSION:
                    reply = ("error", f"the saved state in {self.directory} has format version "
                                      f"{state.get('version')}, expected {VERSION}")
                elif state["key"] != self.key:
                    what = differences(state["settings"], self.settings) or "settings"
                    reply = ("error", f"cannot resume: the state in {self.directory} was saved with a different "
                                      f"config ({what}); remove it or set resume=false to start over")
                else:
                    reply = ("ok", SavedStages(int(state["stages_done"]), state["weights"], state["support"],
                                               json.loads(state["reports"]), int(state["world_size"])))
            except Exception as e:  # noqa: BLE001 - torch.load raises many types for a damaged file
                reply = ("error", f"cannot read the saved state {self.path}: {str(e).strip().splitlines()[0]}")
        kind, value = comm.broadcast_object(reply)
        if kind == "error":
            raise ResumeError(value)
        return value

    def on_stage_end(self, previous: Sequence[dict] = ()) -> Callable:
        """The pipeline's ``on_stage_end(stage, w_local, support_local, report)`` callback: gathers the full
        w (p,) and S (p,) to every rank and writes them (rank 0), atomically, with the stage reports so far
        (``previous``: the reports of stages restored by :meth:`load`)."""
        done: list[dict] = list(previous)

        def callback(stage: int, w_local: torch.Tensor, support_local: torch.Tensor, report) -> None:
            w = _gather_full(w_local.float().contiguous())
            s = _gather_full(support_local.to(torch.uint8).contiguous()).bool()
            done.append(dict(vars(report)))
            self._factor_path(stage).unlink(missing_ok=True)  # the stage is complete: its factor is not needed
            if comm.is_main():
                self.directory.mkdir(parents=True, exist_ok=True)
                _atomic_save({"version": VERSION, "key": self.key, "settings": self.settings,
                              "stages_done": stage + 1, "weights": w.cpu(), "support": s.cpu(),
                              "reports": json.dumps(done, default=float), "world_size": comm.world_size()},
                             self.path)

        return callback

    def _factor_path(self, stage: int) -> Path:
        return self.directory / f"factor-stage{stage + 1}-rank{comm.rank()}-of{comm.world_size()}.pt"

    def save_factor(self, stage: int, At: torch.Tensor) -> None:
        """The pipeline's ``on_factor``: every rank writes its A_r^T (p_r, n) of stage ``stage`` (0-based), so a
        run stopped in the solver resumes without the per-sample gradient phase. Needs ranks to see their own
        files again on resume (same hosts, same world size)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        _atomic_save({"version": VERSION, "key": self.key, "stage": stage, "At": At}, self._factor_path(stage))

    def load_factor(self, stage: int) -> torch.Tensor | None:
        """The pipeline's ``load_factor``: this rank's saved A_r^T of ``stage`` if every rank has a valid one
        (same settings and world size), else None on every rank. Collective."""
        At, path = None, self._factor_path(stage)
        if path.exists():
            try:
                saved = torch.load(path, map_location="cpu", weights_only=True)
                if saved.get("version") == VERSION and saved["key"] == self.key and saved["stage"] == stage:
                    At = saved["At"]
            except Exception:  # noqa: BLE001 - a damaged factor is recomputed
                At = None
        ok = comm.all_reduce(torch.tensor([0 if At is None else 1], dtype=torch.int64, device=comm.device()), op="min")
        return At if int(ok.item()) == 1 else None

    def remove(self) -> None:
        """Delete the state directory (rank 0; after the result has been saved)."""
        if comm.is_main() and self.directory.exists():
            shutil.rmtree(self.directory, ignore_errors=True)
