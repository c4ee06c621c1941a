"""Capture for layer-wise fine-tuning (adaptwin/finetune/capture.py): each layer's calls replay exactly, masks
survive half-precision storage, and the activation store counts, copies and deletes what it holds.
"""

from __future__ import annotations

import functools

import pytest
import torch
from tiny_models import FT_ROWS, ROW_BY_NAME, calibration, leaves
from torch import nn

import adaptwin
from adaptwin.finetune import ActivationStore, capture
from adaptwin.finetune.capture import first_output

pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def original(name: str, attn_implementation: str = "sdpa") -> nn.Module:
    return ROW_BY_NAME[name].build(attn_implementation)  # never modified (compress copies)



@pytest.mark.parametrize("name", FT_ROWS)
def test_capture_replays_exactly(name):
    """The original layer run on the captured (args, kwargs) gives the captured output bit for bit."""
    model = original(name)
    adapter = adaptwin.get_architecture(model.config.model_type)
    paths = [p for p, _ in adapter.layer_paths(model)]
    store = ActivationStore()
    batches = calibration(name, 2)
    assert capture(model, paths, batches, store) == 2
    with torch.no_grad():
        for path in paths:
            for b in range(2):
                args, kwargs, target = store.get(path, b)
                out = first_output(model.get_submodule(path)(*args, **kwargs))
                assert torch.equal(out, target), (path, b)
    if name == "whisper":  # decoder layers: cross-attention states and the padding mask are part of the call
        with torch.no_grad():
            enc = model.model.encoder(batches[0]["input_features"]).last_hidden_state
        for path in [p for p in paths if ".decoder." in p]:
            call = leaves(store.get(path, 0)[:2])
            assert any(t.shape == enc.shape and torch.equal(t, enc) for t in call), path
            masks = [t for t in call if t.ndim == 4]
            assert masks and not bool(masks[0].all()), f"{path}: the decoder padding mask was not captured"


def test_capture_keeps_masks_exact_in_half_storage():
    """An eager additive mask holds finfo(float32).min; in float16 (or bfloat16) that rounds to -inf and a
    fully masked (left-padded) query row turns from a uniform softmax into NaN. Such tensors stay float32."""
    model = original("gpt2", "eager")
    batches = calibration("gpt2", 1)
    ref, half = ActivationStore(), ActivationStore(dtype="float16")
    capture(model, ["transformer.h.0"], batches, ref)
    capture(model, ["transformer.h.0"], batches, half)
    (args32, kw32, _), (args16, kw16, _) = ref.get("transformer.h.0", 0), half.get("transformer.h.0", 0)
    mask32 = [t for t in leaves((args32, kw32)) if t.ndim == 4]
    mask16 = [t for t in leaves((args16, kw16)) if t.ndim == 4]
    assert mask32 and mask32[0].dtype == torch.float32 and bool((mask32[0] == torch.finfo(torch.float32).min).any())
    assert torch.equal(mask16[0], mask32[0])
    stored = half._memory[("transformer.h.0", 0)]
    assert stored[0][0].dtype == torch.float16 and stored[2].dtype == torch.float16  # hidden states are halved
    # float16 rounding only: relative 2^-11 per entry
    assert (args16[0] - args32[0]).abs().max() <= 2**-11 * args32[0].abs().max()


def test_store_nbytes_counts_bytes_held():
    """nbytes = distinct bytes really held, counted here from the shapes: per batch, BERT's 2 layers need
    the 3 hidden states (in_0, out_0 = in_1, out_1; shared, not copied twice) and one bool mask
    (2, 1, 9, 9) that both layers receive. float16 halves the hidden states; the bool mask stays."""
    model = original("bert")
    paths = ["encoder.layer.0", "encoder.layer.1"]
    n, hidden, mask = 3, 2 * 9 * 32, 2 * 9 * 9
    for dtype, size in (("float32", 4), ("float16", 2), ("bfloat16", 2)):
        store = ActivationStore(dtype=dtype)
        capture(model, paths, calibration("bert", n), store)
        assert store.nbytes == n * (3 * hidden * size + mask), dtype
        store.drop(paths[0])  # out_0 is still layer 1's input: only in_0 is freed
        assert store.nbytes == n * (2 * hidden * size + mask), dtype
        store.drop(paths[1])
        assert store.nbytes == 0 and store.peak_nbytes == n * (3 * hidden * size + mask)


class Doubling(nn.Linear):
    """A layer that doubles its input in place before using it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.mul_(2.0))


class InPlace(nn.Module):
    """Layer 0's output is rescaled in place by the model; layer 1 changes its own input in place."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 8), Doubling(8, 8)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layers[0](x)
        h.mul_(3.0)
        return self.layers[1](h)


def test_store_holds_its_own_copies():
    """Calls are stored as they happened: a layer's output as it returned it (the model rescales it in
    place afterwards), a layer's inputs as they arrived (the layer changes them in place while running).
    A stored call changed in place after capture is refused rather than silently trained on."""
    torch.manual_seed(0)
    model, store = InPlace(), ActivationStore()
    x = torch.randn(3, 8)
    with torch.no_grad():
        h0 = model.layers[0](x)
        out = model.layers[1](3.0 * h0)
    capture(model, ["layers.0", "layers.1"], [x.clone()], store, run=lambda m, b: m(b))
    assert torch.equal(store.get("layers.0", 0)[2], h0)
    args, _, target = store.get("layers.1", 0)
    assert torch.equal(args[0], 3.0 * h0) and torch.equal(target, out)
    with torch.no_grad():
        assert torch.equal(model.layers[1](args[0].clone()), target)
        model.layers[1](args[0])  # changes the stored tensor
    with pytest.raises(RuntimeError, match="modified in place"):
        store.get("layers.1", 0)


def test_disk_store_nbytes_is_file_sizes(tmp_path):
    store = ActivationStore("disk", "float16", tmp_path / "act")
    capture(original("whisper"), ["model.encoder.layers.0", "model.decoder.layers.0"], calibration("whisper", 2),
            store)
    files = list((tmp_path / "act").iterdir())
    assert len(files) == 4 and store.nbytes == sum(f.stat().st_size for f in files)
    assert not [f for f in files if not f.name.endswith(".safetensors")]  # no temporaries left
    store.drop("model.encoder.layers.0")
    store.drop("model.decoder.layers.0")
    assert store.nbytes == 0 and not list((tmp_path / "act").iterdir())
