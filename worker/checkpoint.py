"""Checkpoints of a trial in training, so that a retried trial resumes where it was.

After every epoch the training loop hands a `TrainingState` to `CheckpointStore.save`,
which writes it to `{checkpoint_dir}/{study}/trial-{number}.pt`: first to a temporary
file in the same folder, then `os.replace`, so that a reader (another worker on a shared
volume, or this one after a crash) sees the previous checkpoint or the new one, never
half of one. A retry of the trial, on whichever worker claims it, loads it and goes on
from the next epoch.

What a checkpoint holds is a contract: everything the rest of the run depends on.

| key           | what                                                                 |
|---------------|----------------------------------------------------------------------|
| `format`      | `FORMAT_VERSION`; another version is ignored, not guessed at         |
| `config`      | the trial's parameters, task and objective; another trial's is ignored |
| `epoch`       | epochs done                                                          |
| `iteration`   | optimizer steps done (the scheduler's own count is in `scheduler`)   |
| `model`, `optimizer`, `scheduler` | their `state_dict()`s                            |
| `torch_rng`, `cuda_rng`, `shuffle_rng` | generator states (CUDA only when trained there) |
| `epochs`      | every epoch's results so far, with the LR and momentum of each step  |

The caller deletes a checkpoint once the trial's final result is safely recorded, not
when training ends: a worker that dies before its completion reaches the server leaves
the checkpoint behind, and the retry then finds every epoch done and only reports.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass
class TrainingState:
    """Where a trial's training stands at the end of an epoch."""

    config: dict[str, Any]
    epoch: int
    iteration: int
    model: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    torch_rng: torch.Tensor
    shuffle_rng: torch.Tensor
    # `EpochResult`s as plain dicts: the file is read with `weights_only=True`, which
    # allows containers of numbers and tensors only.
    epochs: list[dict[str, Any]] = field(default_factory=list)
    cuda_rng: torch.Tensor | None = None


class CheckpointStore:
    """The checkpoint file of one trial: save, load, delete."""

    def __init__(self, root: Path, study_name: str, number: int) -> None:
        self.study_name = study_name
        self.number = number
        # Study names are letters, digits, '_', '.' and '-' and start with a letter or
        # digit (`clrsearch.spec.STUDY_NAME_PATTERN`), so they are safe folder names.
        self.path = Path(root) / study_name / f"trial-{number}.pt"

    @property
    def label(self) -> str:
        return f"trial {self.number} of study {self.study_name!r}"

    def save(self, state: TrainingState) -> None:
        """Write `state` atomically; the previous checkpoint stays whole until replaced."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": FORMAT_VERSION,
            "config": state.config,
            "epoch": state.epoch,
            "iteration": state.iteration,
            "model": state.model,
            "optimizer": state.optimizer,
            "scheduler": state.scheduler,
            "torch_rng": state.torch_rng,
            "cuda_rng": state.cuda_rng,
            "shuffle_rng": state.shuffle_rng,
            "epochs": state.epochs,
        }
        # A name of its own per writer: two attempts of one trial (a lapsed lease whose
        # worker still trains) may save at once on a shared volume.
        temporary = self.path.with_name(
            f".{self.path.name}.{os.getpid()}-{threading.get_ident()}.tmp"
        )
        try:
            with temporary.open("wb") as handle:
                torch.save(payload, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
        finally:
            temporary.unlink(missing_ok=True)
        logger.debug("%s: checkpoint saved after epoch %d at %s", self.label, state.epoch,
                     self.path)

    def load(self, config: dict[str, Any]) -> TrainingState | None:
        """The saved state of this trial, or None when there is none to resume from.

        A checkpoint that cannot be read, has another format, or was written for other
        parameters (a study deleted and submitted again under its name) is set aside
        with a warning: training starts afresh rather than from a wrong state.
        """
        if not self.path.exists():
            return None
        try:
            payload = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as error:  # a damaged file of any kind: start afresh
            logger.warning("%s: checkpoint %s cannot be read (%s); starting afresh",
                           self.label, self.path, error)
            return None
        if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
            found = payload.get("format") if isinstance(payload, dict) else type(payload)
            logger.warning("%s: checkpoint %s has format %r, not %d; starting afresh",
                           self.label, self.path, found, FORMAT_VERSION)
            return None
        if payload["config"] != config:
            logger.warning("%s: checkpoint %s was written for another configuration (%s); "
                           "starting afresh", self.label, self.path, payload["config"])
            return None
        state = TrainingState(
            config=payload["config"], epoch=payload["epoch"], iteration=payload["iteration"],
            model=payload["model"], optimizer=payload["optimizer"],
            scheduler=payload["scheduler"], torch_rng=payload["torch_rng"],
            shuffle_rng=payload["shuffle_rng"], epochs=payload["epochs"],
            cuda_rng=payload["cuda_rng"],
        )
        logger.info("%s resumes from its checkpoint after epoch %d (iteration %d)",
                    self.label, state.epoch, state.iteration)
        return state

    def delete(self) -> None:
        if self.path.exists():
            self.path.unlink(missing_ok=True)
            logger.info("%s: checkpoint deleted", self.label)
