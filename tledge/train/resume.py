"""Resume after an interruption: the training state, written atomically, read back with ``weights_only=True``.

The file holds the results of the runs already finished (a run: one stage of a strategy, the scratch baseline,
one point of a curve), each track's model after its last finished run, and the latest epoch of the run in
progress (weights, optimizer, schedule, best weights so far, history, torch RNG). Runs seed themselves and their
shuffles and augmentations are seeded by epoch, so a resumed fine-tune ends where an uninterrupted one would.
The file is tied to the settings and the data (a fingerprint); it is removed when the fine-tune completes.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

RESUME_FILE = "finetune.resume.pt"
RESUME_FORMAT = "tledge.finetune-resume/1"


class Progress:
    """The resume file of one fine-tune. ``writer`` is False on every torchrun rank but 0 (they only read)."""

    def __init__(self, path: Path | None, fingerprint: dict, writer: bool = True, every_s: float = 60.0, load: bool = True):
        self.path, self.writer, self.every_s = path, writer, every_s
        self.fingerprint = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()
        self.state = {"format": RESUME_FORMAT, "fingerprint": self.fingerprint, "done": {}, "models": {}, "partial": None}
        self.resumed = False
        self._summary = None
        self._last_write = time.monotonic()
        if load and path is not None and path.is_file():
            self._load()

    def _load(self) -> None:
        import torch

        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception:  # a file that is not ours, or torn by something other than our atomic writes: start over
            return
        if isinstance(state, dict) and state.get("format") == RESUME_FORMAT and state.get("fingerprint") == self.fingerprint:
            self.state = state
            self.resumed = bool(state["done"] or state["partial"])
            p = state["partial"]
            self._summary = {"runs_done": list(state["done"]), "run_in_progress": p and {"name": p["name"], "epochs_done": p["epoch"]}}

    def summary(self) -> dict | None:
        """What the fine-tune found done when it started (None: it started afresh)."""
        return self._summary if self.resumed else None

    # --- finished runs -----------------------------------------------------------------------------------------
    def result(self, name: str) -> dict | None:
        return self.state["done"].get(name)

    def restore(self, track: str, model) -> bool:
        """Load ``track``'s model as it was after its last finished run; False when none finished yet."""
        state = self.state["models"].get(track)
        if state is None:
            return False
        model.load_state_dict(state)
        return True

    def finish(self, name: str, result: dict, track: str, model) -> None:
        self.state["done"][name] = result
        self.state["models"][track] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        self.state["partial"] = None
        self._write(force=True)

    # --- the run in progress -----------------------------------------------------------------------------------
    def partial(self, name: str) -> dict | None:
        p = self.state["partial"]
        return p if p is not None and p["name"] == name else None

    def due(self) -> bool:
        """Whether an epoch's state should be written now (at most one write per ``every_s`` seconds)."""
        return self.path is not None and self.writer and time.monotonic() - self._last_write >= self.every_s

    def save_epoch(self, name: str, payload: dict) -> None:
        self.state["partial"] = {"name": name, **payload}
        self._write(force=True)

    def _write(self, force: bool = False) -> None:
        if self.path is None or not self.writer:
            return
        import torch

        from tledge.artifacts import atomic_path

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            torch.save(self.state, tmp)
        self._last_write = time.monotonic()

    def remove(self) -> None:
        if self.path is not None and self.writer:
            self.path.unlink(missing_ok=True)
