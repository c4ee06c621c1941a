"""Progress of layer-wise fine-tuning, drawn on stderr (tqdm bars on a terminal, one line per layer otherwise)."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any


class EpochProgress:
    """The ``progress(layer, epoch, epochs, loss)`` callback of fine-tuning, drawn on stderr.

    On a terminal (one process): a tqdm bar per layer over its epochs, with ETA and the last epoch's
    training loss. Otherwise (a log file, or torchrun ranks whose bars would overwrite each other):
    one line per finished layer.
    """

    def __init__(self, layers: Sequence[str], rank: int = 0, world: int = 1) -> None:
        self.index = {p: i for i, p in enumerate(layers, 1)}
        self.total = len(layers)
        self.stream = sys.stderr
        self.bars = world == 1 and self.stream.isatty()
        self.prefix = f"[rank {rank}] " if world > 1 else ""
        self.layer: str | None = None
        self.bar: Any = None
        self.epoch, self.epochs, self.loss, self.start = 0, 0, float("nan"), 0.0

    def __call__(self, layer: str, epoch: int, epochs: int, loss: float) -> None:
        if layer != self.layer:
            self.close()
            self.layer, self.start = layer, time.perf_counter()
            if self.bars:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=epochs, desc=f"{layer} ({self._position()})", unit="epoch",
                                file=self.stream, dynamic_ncols=True)
        self.epoch, self.epochs, self.loss = epoch, epochs, loss
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3g}", refresh=False)
            self.bar.update(1)

    def _position(self) -> str:
        return f"{self.index.get(self.layer, '?')}/{self.total}"

    def close(self) -> None:
        if self.layer is None:
            return
        early = self.epoch < self.epochs
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss={self.loss:.3g}{', stopped early' if early else ''}")
            self.bar.close()
        else:
            epochs = f"{self.epoch}/{self.epochs} epochs (stopped early)" if early else f"{self.epoch} epochs"
            print(f"{self.prefix}fine-tuned {self.layer} ({self._position()}): {epochs}, "
                  f"train loss {self.loss:.3g}, {time.perf_counter() - self.start:.1f} s",
                  file=self.stream, flush=True)
        self.layer, self.bar = None, None
