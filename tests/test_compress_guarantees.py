"""What `compress` and `finetune` guarantee around the maths (the Python API audit of 2026-11-26): targets from
the original in eval mode, a fine-tuning run recorded in the model, an in-place compress that an error leaves
whole, refused options and meta-device models, factors on the model's device."""

from __future__ import annotations

import pytest
import torch
from tiny_models import calibration

import adaptwin
from adaptwin.finetune import FinetuneConfig


def test_targets_come_from_the_original_in_eval_mode():
    """An original left in train() mode (just trained) gave dropout-noised targets; capture and the whitening
    statistics now run it in eval mode and give it back in the mode it came in."""
    import tiny_models as tm

    cal = calibration("bert", 4)
    cfg = FinetuneConfig(epochs=2, patience=0, progress=False, init="whiten")
    runs = []
    for train in (False, True):
        original = tm.bert()
        original.train(train)
        small = adaptwin.compress(original, adaptwin.CompressionConfig(ratio=0.5), calibration=cal, finetune=cfg)
        assert original.training is train
        runs.append([row["error_before"] for row in small.adaptwin_record.finetune["layers"]])
    assert runs[0] == runs[1]  # (before: 0.7086 / 0.6752 in eval mode against 0.7377 / 0.7376 with dropout)


def test_finetune_called_alone_records_its_run():
    """`adaptwin.finetune` on a compressed model writes its settings and errors to the record, as compress with
    calibration does: save keeps them and select_layers reads them (it refused, or ranked by stale errors)."""
    import tiny_models as tm

    original, cal = tm.bert(), calibration("bert", 4)
    small = adaptwin.compress(original, adaptwin.CompressionConfig(ratio=0.5))
    report = adaptwin.finetune(original, small, cal, FinetuneConfig(epochs=2, patience=0, progress=False))
    record = small.adaptwin_record.finetune
    assert small.adaptwin_finetune is report and record["config"]["epochs"] == 2
    assert [r["error_after"] for r in record["layers"]] == [r.error_after for r in report.layers]
    again = adaptwin.finetune(original, small, cal, FinetuneConfig(epochs=3, patience=0, progress=False))
    assert [r["error_before"] for r in small.adaptwin_record.finetune["layers"]] == [
        r.error_before for r in again.layers]  # the latest run's, not the first's
    adaptwin.select_layers(small, original, keep_size=0.9)


def test_a_compressor_that_raises_leaves_an_inplace_model_whole(monkeypatch):
    """compress(inplace=True) swaps the replacements in only once every site is built: a compressor raising
    on a later site left the first layers replaced and the rest not, with no record."""
    import tiny_models as tm

    from adaptwin.compressors.ffn_svd.transform import SVDCompressor

    class Flaky(SVDCompressor):
        name = "flaky_svd"
        calls = 0

        def compress(self, *args, **kwargs):
            Flaky.calls += 1
            if Flaky.calls == 3:
                raise RuntimeError("out of memory (simulated)")
            return super().compress(*args, **kwargs)

    from adaptwin import registry

    monkeypatch.setitem(registry._COMPRESSORS, Flaky.name, Flaky())  # registered for this test only
    model = tm.bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="simulated"):
        adaptwin.compress(model, adaptwin.CompressionConfig(attention_rank=4, ffn_rank=8, ffn_method="flaky_svd"),
                          inplace=True)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert getattr(model, "adaptwin_record", None) is None
    small = adaptwin.compress(model, adaptwin.CompressionConfig(attention_rank=4, ffn_rank=8))  # still compressible
    assert small.adaptwin_record.sites


def test_options_of_a_compressor_without_options_are_refused():
    import tiny_models as tm

    for options, why in (({"svd": {"foo": 2}}, r"method_options\['svd'\]: the svd compressor takes no options, "
                                                 r"got \['foo'\]"),
                         ({"residual": {"gruop_size": 2}}, r"unknown residual options \['gruop_size'\]")):
        with pytest.raises(ValueError, match=why):
            adaptwin.compress(tm.bert(), adaptwin.CompressionConfig(attention_rank=4, ffn_rank=8,
                                                                    method_options=options))


def test_compress_refuses_a_model_without_weights():
    import tiny_models as tm
    from transformers import BertConfig, BertModel

    with torch.device("meta"):
        model = BertModel(tm._bert_config(BertConfig, "sdpa"))
    assert adaptwin.plan(model, adaptwin.CompressionConfig(ratio=0.5)).rows  # planning needs no weights
    with pytest.raises(ValueError, match="on the meta device: compress needs its weights"):
        adaptwin.compress(model, adaptwin.CompressionConfig(ratio=0.5))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compress_on_cuda_matches_cpu():
    """Every factor is built on the model's device (product twins' LoRA padding and folded bias were made on
    the CPU: torch.cat of CPU and CUDA tensors)."""
    import tiny_models as tm

    cfg = adaptwin.CompressionConfig(ratio=0.5)
    cpu = adaptwin.compress(tm.bert(), cfg)
    gpu = adaptwin.compress(tm.bert().cuda(), cfg)
    assert {p.device.type for p in gpu.parameters()} == {"cuda"}
    ids = torch.arange(12).reshape(2, 6) % 50
    with torch.no_grad():
        torch.testing.assert_close(gpu(input_ids=ids.cuda()).last_hidden_state.cpu(),
                                   cpu(input_ids=ids).last_hidden_state, rtol=1e-4, atol=1e-4)
