"""Checkpoints that survive a kill at any instant: write to a temp folder, fsync, then rename.

A checkpoint is a folder ``step-NNNNNNNN`` holding the model, optimizer and scheduler states,
the RNG states, and ``trainer_state.json`` (step, data position, best validation loss, the MLflow
run id and the resolved config). Every file and the temp folder are fsynced before the rename,
and the parent folder after it: ``os.replace`` of a folder is atomic on POSIX, so any ``step-*``
folder that exists is complete and on disk. A run killed while writing leaves only a ``.tmp-*``
folder, which the next save or resume ignores and cleans.

A save can run in the background: the states are copied to host memory on the caller's thread
(the loop goes on changing the originals), and one writer thread writes them. At most one save
is in flight; the next save, :meth:`CheckpointManager.wait` and :meth:`CheckpointManager.close`
join it and raise its error on the caller's thread.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lifecycle.data.publish import fsync_dir
from lifecycle.errors import DataError

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
_PREFIX = "step-"


def rng_state(device: Any = None) -> dict[str, Any]:
    """Every RNG the loop draws from: Python, NumPy, torch CPU, and ``device``'s own CUDA generator.

    Only this rank's device: ``get_rng_state_all()`` would open a context on every visible GPU and
    tie the checkpoint to the GPU count of the machine that wrote it.
    """
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device is not None and getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: Any = None) -> None:
    """Restore what :func:`rng_state` captured; the CUDA state goes to ``device`` when it is a GPU.

    The states must be CPU tensors (``torch.set_rng_state`` refuses anything else): load
    checkpoints with :meth:`CheckpointManager.load`, which maps everything to the CPU.
    """
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or device is None or getattr(device, "type", str(device)) != "cuda":
        return
    if isinstance(cuda, (list, tuple)):
        # Checkpoints written before the per-device state held one state per visible GPU.
        index = torch.device(device).index or 0
        if index >= len(cuda):
            log.warning("the checkpoint has no CUDA RNG state for %s; that generator starts fresh", device)
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda, device)


def to_host(obj: Any) -> Any:
    """A deep copy of ``obj`` with every tensor copied to host memory (the originals keep changing)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_host(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_host(v) for v in obj)
    return obj


class CheckpointManager:
    """Save, find, load and prune checkpoints in one output folder."""

    def __init__(self, root: str | Path, *, keep: int = 2):
        self.root = Path(root)
        self.keep = keep
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._pending_path: Path | None = None
        self._last_done: Path | None = None
        self._lock = threading.Lock()

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir()
                 if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX):].isdigit()
                 and (p / STATE_FILE).is_file()]
        return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        found = self.checkpoints()
        return found[-1] if found else None

    def clear(self) -> None:
        """Remove every checkpoint and leftover temp folder (``--overwrite``)."""
        self.wait()
        if self.root.is_dir():
            for p in self.root.iterdir():
                if p.is_dir() and (p.name.startswith(_PREFIX) or p.name.startswith(".tmp-")):
                    shutil.rmtree(p, ignore_errors=True)

    # -- saving --------------------------------------------------------------------------------

    def save(self, step: int, *, model_state: dict[str, Any], optimizer_state: dict[str, Any],
             scheduler_state: dict[str, Any], trainer_state: dict[str, Any],
             best_state: dict[str, Any] | None = None, device: Any = None, background: bool = False) -> Path:
        """Write checkpoint ``step`` atomically and prune old ones; returns its folder.

        With ``background`` the states are copied to host memory here and written by the writer
        thread; the returned folder exists once :meth:`wait` returns. ``best_state`` is never
        copied: the loop replaces that dict instead of changing it, and it already lives on the CPU.
        """
        self.wait()  # at most one save in flight; an earlier failure surfaces here
        payload = {
            "model": model_state,
            "optim": {"optimizer": optimizer_state, "scheduler": scheduler_state, "rng": rng_state(device)},
            "best": best_state,
            # Serialised now: the loop keeps appending to the history it holds.
            "state": json.dumps(trainer_state, indent=2, sort_keys=True, default=str),
        }
        final = self.root / f"{_PREFIX}{step:08d}"
        if not background:
            self._write(step, payload)
            return final
        payload["model"] = to_host(model_state)
        payload["optim"] = to_host(payload["optim"])
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        with self._lock:
            self._pending = self._executor.submit(self._write, step, payload)
            self._pending_path = final
        return final

    def wait(self) -> Path | None:
        """Join the save in flight (if any); raise its error here. Returns the newest saved folder."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()
        return self._last_done

    def close(self) -> None:
        """Join the save in flight and stop the writer thread (errors propagate)."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    @property
    def last_saved(self) -> Path | None:
        """The newest checkpoint this manager finished writing (a save in flight does not count)."""
        return self._last_done

    def _write(self, step: int, payload: dict[str, Any]) -> Path:
        import torch

        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"{_PREFIX}{step:08d}"
        tmp = self.root / f".tmp-{_PREFIX}{step:08d}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        _save_synced(torch, payload["model"], tmp / "model.pt")
        _save_synced(torch, payload["optim"], tmp / "optim.pt")
        if payload["best"] is not None:
            _save_synced(torch, payload["best"], tmp / "best_model.pt")
        # The state file goes last: its presence marks the folder complete even without rename.
        with open(tmp / STATE_FILE, "w", encoding="utf-8") as fh:
            fh.write(payload["state"])
            fh.flush()
            os.fsync(fh.fileno())
        fsync_dir(tmp)  # the folder's entries must be durable before its name is
        if final.exists():
            # Re-saving a step after a resume: move the old copy aside first (rename is atomic).
            trash = self.root / f".tmp-old-{final.name}-{os.getpid()}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(self.root)
        self._last_done = final
        self._prune()
        return final

    def _prune(self) -> None:
        for old in self.checkpoints()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for p in self.root.iterdir():
            if p.name.startswith(".tmp-") and not p.name.endswith(f"-{os.getpid()}"):
                shutil.rmtree(p, ignore_errors=True)

    # -- reading -------------------------------------------------------------------------------

    @staticmethod
    def read_state(path: Path) -> dict[str, Any]:
        """The ``trainer_state.json`` of one checkpoint."""
        try:
            return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"checkpoint {path} is unreadable: {exc}") from None

    @staticmethod
    def load(path: Path) -> dict[str, Any]:
        """Model, optimizer, scheduler, RNG and best-model states of one checkpoint, all on the CPU.

        Always the CPU: the RNG states must stay CPU tensors (``torch.set_rng_state`` refuses a
        GPU tensor), and ``load_state_dict`` moves model and optimizer states to their parameters.
        """
        import pickle

        import torch

        try:
            out: dict[str, Any] = {"model": torch.load(path / "model.pt", map_location="cpu", weights_only=True)}
            # RNG states hold numpy/python objects: these files are ours, written by save().
            out.update(torch.load(path / "optim.pt", map_location="cpu", weights_only=False))
            best = path / "best_model.pt"
            out["best"] = torch.load(best, map_location="cpu", weights_only=True) if best.is_file() else None
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise DataError(f"checkpoint {path} is unreadable: {first[:200]}") from None
        out["state"] = CheckpointManager.read_state(path)
        return out

    def load_latest(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint that loads, skipping damaged ones with a warning naming each."""
        for path in reversed(self.checkpoints()):
            try:
                return path, self.load(path)
            except DataError as exc:
                log.warning("skipping damaged checkpoint: %s", exc)
        return None


def _save_synced(torch: Any, obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` and fsync it (a rename must never expose unwritten data)."""
    with open(path, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
