"""`FinetuneConfig`: how each compressed layer is trained to reproduce the original layer (Eq. 9)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

MODES = ("all", "spectral", "lora_scratch", "lora_only")
INITS = ("svd", "whiten")
STORAGES = ("memory", "disk")
STORAGE_DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class FinetuneConfig:
    """Layer-wise fine-tuning: min ‖T'(X_in) − X_out‖² per layer on captured calibration activations.

    Args:
        epochs: passes over the training batches per layer.
        lr: Adam learning rate.
        mode: the paper's ablations — ``"all"`` (spectral + LoRA factors trainable), ``"spectral"``
            (rank r+l SVD, no LoRA), ``"lora_scratch"`` (rank r+l LoRA factors from scratch, no SVD),
            ``"lora_only"`` (SVD + LoRA, only the LoRA factors trainable).
        init: ``"svd"`` (weight SVD) or ``"whiten"`` (SVD of the activation-whitened product, so
            truncation minimises output rather than weight error; needs the calibration data).
        sequential: layer i learns from the outputs of the already fine-tuned layers before it,
            instead of the original model's (the paper's independent mode, the default).
        holdout: fraction of calibration batches held out for early stopping (at least one batch when
            there are two or more).
        patience: epochs without held-out improvement before stopping a layer; 0 disables.
        storage: keep captured activations in ``"memory"`` or stream them to ``"disk"`` (safetensors
            files, memory-mapped on read) under ``storage_dir``.
        storage_dtype: dtype activations are stored in (``"float16"``/``"bfloat16"`` halve the bytes).
        run_dir: where per-layer checkpoints are written (atomically); a run with the same command
            resumes from them. None keeps everything in memory.
        seed: seed of the per-layer shuffling and initialisation (each layer derives its own).
        progress: show progress bars.
    """

    epochs: int = 40
    lr: float = 1e-3
    mode: str = "all"
    init: str = "svd"
    sequential: bool = False
    holdout: float = 0.1
    patience: int = 5
    storage: str = "memory"
    storage_dtype: str = "float32"
    storage_dir: str | None = None
    run_dir: str | None = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "patience", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a whole number >= 0, got {value!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not 0 < self.lr < float("inf"):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        for name, allowed in (("mode", MODES), ("init", INITS), ("storage", STORAGES),
                              ("storage_dtype", STORAGE_DTYPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if (isinstance(self.holdout, bool) or not isinstance(self.holdout, (int, float))
                or not 0.0 <= self.holdout < 1.0):
            raise ValueError(f"holdout must be a number in [0, 1) (the fraction of batches held out), "
                             f"got {self.holdout!r}")
        for name in ("sequential", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.storage == "disk" and not self.storage_dir:
            raise ValueError("storage='disk' needs storage_dir (a folder for the captured activations)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FinetuneConfig:
        """Inverse of `to_json`."""
        from adaptwin.config import parse_json

        return cls.from_dict(parse_json(text, cls.__name__))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        """Inverse of `to_dict` (e.g. ``record.finetune["config"]`` of a saved model)."""
        if not isinstance(d, dict):
            raise ValueError(f"a FinetuneConfig is stored as a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown FinetuneConfig fields {unknown}; allowed: {sorted(known)}")
        return cls(**d)

    def fingerprint(self) -> dict[str, Any]:
        """The fields that change the trained weights (a resumed run must match them).

        Storage and its folder are left out: disk storage trains bit-identically to memory storage.
        """
        d = self.to_dict()
        for k in ("progress", "storage", "storage_dir", "run_dir"):
            d.pop(k)
        return d
