"""Checkpoints that survive a kill at any instant: write to a temp folder, then rename.

A checkpoint is a folder ``step-NNNNNNNN`` holding the model, optimizer and scheduler states,
every RNG state, and ``trainer_state.json`` (step, data position, best validation loss, the MLflow
run id and the resolved config). ``os.replace`` of a folder is atomic on POSIX, so any
``step-*`` folder that exists is complete: a run killed while writing leaves only a ``.tmp-*``
folder, which the next save or resume ignores and cleans.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

from lifecycle.errors import DataError

STATE_FILE = "trainer_state.json"
_PREFIX = "step-"


def rng_state() -> dict[str, Any]:
    """Every RNG the loop can draw from: Python, NumPy, torch CPU and CUDA."""
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only where CUDA is present)."""
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Save, find, load and prune checkpoints in one output folder."""

    def __init__(self, root: str | Path, *, keep: int = 2):
        self.root = Path(root)
        self.keep = keep

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir()
                 if p.is_dir() and p.name.startswith(_PREFIX) and (p / STATE_FILE).is_file()]
        return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        found = self.checkpoints()
        return found[-1] if found else None

    def clear(self) -> None:
        """Remove every checkpoint and leftover temp folder (``--overwrite``)."""
        if self.root.is_dir():
            for p in self.root.iterdir():
                if p.is_dir() and (p.name.startswith(_PREFIX) or p.name.startswith(".tmp-")):
                    shutil.rmtree(p, ignore_errors=True)

    def save(self, step: int, *, model_state: dict[str, Any], optimizer_state: dict[str, Any],
             scheduler_state: dict[str, Any], trainer_state: dict[str, Any],
             best_state: dict[str, Any] | None = None) -> Path:
        """Write checkpoint ``step`` atomically and prune old ones; returns its folder."""
        import torch

        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"{_PREFIX}{step:08d}"
        tmp = self.root / f".tmp-{_PREFIX}{step:08d}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        torch.save(model_state, tmp / "model.pt")
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler_state, "rng": rng_state()}, tmp / "optim.pt")
        if best_state is not None:
            torch.save(best_state, tmp / "best_model.pt")
        # The state file goes last: its presence marks the folder complete even without rename.
        with open(tmp / STATE_FILE, "w", encoding="utf-8") as fh:
            json.dump(trainer_state, fh, indent=2, sort_keys=True, default=str)
            fh.flush()
            os.fsync(fh.fileno())
        if final.exists():
            # Re-saving a step after a resume: move the old copy aside first (rename is atomic).
            trash = self.root / f".tmp-old-{final.name}-{os.getpid()}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(self.root)
        self._prune()
        return final

    def _prune(self) -> None:
        for old in self.checkpoints()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for p in self.root.iterdir():
            if p.name.startswith(".tmp-") and not p.name.endswith(f"-{os.getpid()}"):
                shutil.rmtree(p, ignore_errors=True)

    @staticmethod
    def read_state(path: Path) -> dict[str, Any]:
        """The ``trainer_state.json`` of one checkpoint."""
        try:
            return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"checkpoint {path} is unreadable: {exc}") from None

    @staticmethod
    def load(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
        """Model, optimizer, scheduler, RNG and best-model states of one checkpoint."""
        import torch

        out: dict[str, Any] = {"model": torch.load(path / "model.pt", map_location=map_location, weights_only=True)}
        # RNG states hold numpy/python objects: these files are ours, written by save().
        out.update(torch.load(path / "optim.pt", map_location=map_location, weights_only=False))
        best = path / "best_model.pt"
        out["best"] = torch.load(best, map_location="cpu", weights_only=True) if best.is_file() else None
        out["state"] = CheckpointManager.read_state(path)
        return out


def _fsync_dir(path: Path) -> None:
    """Make the rename durable (a crash right after must not resurrect the old name)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
