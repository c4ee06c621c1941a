"""Variable compression from one fine-tuning run: `select_layers` on a tiny fine-tuned BERT.

One 4-layer BERT is compressed and fine-tuned once (3 epochs, seconds); every test chooses layers from
that run. Layer 0 keeps its FFN dense (an override), so layers differ in the parameters they save and the
greedy has to skip a layer that does not fit.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_models import reinit

import adaptwin
from adaptwin.finetune.select import plan_selection, select_layers
from adaptwin.fusion import FusedActivation

LAYERS = [f"encoder.layer.{i}" for i in range(4)]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dense():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=48, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=96, max_position_embeddings=32)
    return reinit(BertModel(config), seed=1, std=0.1)  # std 0.1: errors of 0.2-0.4, different per layer


def batches(n: int = 6, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(5, 40, (4, 10), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0  # a padded row
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@pytest.fixture(scope="module")
def tuned(dense):
    config = adaptwin.CompressionConfig(ratio=0.45, overrides={"encoder.layer.0.*": {"ffn_rank": None}})
    return adaptwin.compress(dense, config, calibration=batches(), finetune=adaptwin.FinetuneConfig(epochs=3))


def per_layer(model) -> dict[str, dict[str, float]]:
    """Each layer's params before/after (from the accounting rows) and error after fine-tuning."""
    record = model.adaptwin_record
    errors = {r["path"]: r["error_after"] for r in record.finetune["layers"]}
    out = {}
    for layer in LAYERS:
        rows = [r for r in record.sites if r["path"].startswith(layer + ".")]
        before, after = sum(r["params_before"] for r in rows), sum(r["params_after"] for r in rows)
        out[layer] = {"before": before, "after": after, "saved": before - after, "error": errors[layer]}
    return out


def with_errors(model, errors: dict[str, float]):
    """A copy of ``model`` whose recorded fine-tuning errors are replaced (hand-picked greedy cases)."""
    twin = copy.deepcopy(model)
    for row in twin.adaptwin_record.finetune["layers"]:
        row["error_after"] = errors[row["path"]]
    return twin


def layer_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    hidden = torch.randn(3, 9, 48, generator=torch.Generator().manual_seed(5))  # (B, T, D)
    mask = torch.zeros(3, 1, 1, 9)  # additive mask, (B, 1, 1, T): row 1 pads its last 4 tokens
    mask[1, ..., 5:] = torch.finfo(torch.float32).min
    return hidden, mask


@torch.inference_mode()
def run_layer(model, path: str) -> torch.Tensor:
    hidden, mask = layer_inputs()
    out = model.get_submodule(path)(hidden, attention_mask=mask)
    return out[0] if isinstance(out, tuple) else out


def test_fixture_layers_differ_in_size(tuned):
    sizes = per_layer(tuned)
    assert sizes["encoder.layer.0"]["saved"] < sizes["encoder.layer.1"]["saved"]
    assert len({sizes[p]["saved"] for p in LAYERS[1:]}) == 1


# ---------------------------------------------------------------------------------------------- choosing


def test_keep_size_reverts_worst_error_per_parameter_until_full(tuned, dense):
    sizes = per_layer(tuned)
    original = sum(s["before"] for s in sizes.values())
    kept_all = sum(s["after"] for s in sizes.values())
    ranked = sorted(LAYERS, key=lambda p: -sizes[p]["error"] / sizes[p]["saved"])
    for n in range(len(LAYERS) + 1):  # budgets that fit exactly the n worst layers
        keep = (kept_all + sum(sizes[p]["saved"] for p in ranked[:n])) / original
        sel = plan_selection(tuned, dense, keep_size=keep)
        assert sel.reverted == ranked[:n], n
        assert sel.keep_fraction <= keep + 1e-12
        assert sel.params_kept == kept_all + sum(sizes[p]["saved"] for p in ranked[:n])


def test_greedy_skips_a_layer_that_does_not_fit(tuned, dense):
    sizes = per_layer(tuned)
    small, big = sizes["encoder.layer.0"]["saved"], sizes["encoder.layer.1"]["saved"]
    # Layer 1 costs most per parameter, then layer 0 (the small one), then 2 and 3.
    errs = {"encoder.layer.1": 0.9 * big / 1e4, "encoder.layer.0": 0.8 * small / 1e4,
            "encoder.layer.2": 0.5 * big / 1e4, "encoder.layer.3": 0.4 * big / 1e4}
    twin = with_errors(tuned, errs)
    original = sum(s["before"] for s in sizes.values())
    kept_all = sum(s["after"] for s in sizes.values())
    # Room for the small layer but not the big one: layer 1 is skipped, layer 0 reverted.
    sel = plan_selection(twin, dense, keep_size=(kept_all + small + 1) / original)
    assert sel.reverted == ["encoder.layer.0"]
    # Room for exactly the big one: it goes first and nothing else fits.
    sel = plan_selection(twin, dense, keep_size=(kept_all + big) / original)
    assert sel.reverted == ["encoder.layer.1"]


def test_max_error_reverts_exactly_the_layers_above_it(tuned, dense):
    errors = sorted(per_layer(tuned)[p]["error"] for p in LAYERS)
    threshold = (errors[1] + errors[2]) / 2
    sel = plan_selection(tuned, dense, max_error=threshold)
    assert sorted(sel.reverted) == sorted(p for p in LAYERS if per_layer(tuned)[p]["error"] > threshold)
    assert len(sel.reverted) == 2 and sel.max_kept_error <= threshold
    assert plan_selection(tuned, dense, max_error=1.0).reverted == []
    assert sorted(plan_selection(tuned, dense, max_error=0.0).reverted) == LAYERS


def test_both_budgets_spend_spare_size_after_the_error_budget(tuned, dense):
    sizes = per_layer(tuned)
    worst = max(LAYERS, key=lambda p: sizes[p]["error"])
    original = sum(s["before"] for s in sizes.values())
    kept = sum(s["after"] for s in sizes.values()) + sizes[worst]["saved"]
    threshold = sorted(sizes[p]["error"] for p in LAYERS)[-2]  # only the worst layer exceeds it
    sel = plan_selection(tuned, dense, max_error=threshold, keep_size=kept / original)
    assert sel.reverted == [worst]
    sel = plan_selection(tuned, dense, max_error=threshold, keep_size=1.0)
    assert sel.reverted[0] == worst and sorted(sel.reverted) == LAYERS


# ---------------------------------------------------------------------------------------------- applying


def test_reverted_layers_equal_the_original_exactly(tuned, dense):
    sel_model = select_layers(tuned, dense, max_error=sorted(per_layer(tuned)[p]["error"] for p in LAYERS)[1])
    reverted = sel_model.adaptwin_selection.reverted
    assert len(reverted) == 2
    for path in LAYERS:
        if path in reverted:
            # The same fp32 weights through the same ops: bit-identical, not merely close.
            torch.testing.assert_close(run_layer(sel_model, path), run_layer(dense, path), rtol=0, atol=0)
            ours, theirs = sel_model.get_submodule(path).state_dict(), dense.get_submodule(path).state_dict()
            assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
        else:  # still compressed, still the fine-tuned weights
            torch.testing.assert_close(run_layer(sel_model, path), run_layer(tuned, path), rtol=0, atol=0)
            assert not torch.equal(run_layer(sel_model, path), run_layer(dense, path))
    # reverting modules are copies: training the selection must not touch the original
    first = next(sel_model.get_submodule(reverted[0]).parameters())
    assert first.data_ptr() != next(dense.get_submodule(reverted[0]).parameters()).data_ptr()


def test_selection_of_a_fused_model_keeps_every_activation(tuned, dense):
    threshold = sorted(per_layer(tuned)[p]["error"] for p in LAYERS)[1]
    plain = select_layers(tuned, dense, max_error=threshold)
    fused_model = copy.deepcopy(tuned)
    assert adaptwin.fuse_activations(fused_model)
    chosen = select_layers(fused_model, dense, max_error=threshold)
    assert chosen.adaptwin_selection.reverted == plain.adaptwin_selection.reverted
    for path in LAYERS:  # a reverted nn.Linear gets its GELU back; the compressed layers stay fused
        torch.testing.assert_close(run_layer(chosen, path), run_layer(plain, path), rtol=1e-5, atol=1e-6)
        intermediate = chosen.get_submodule(path).intermediate
        fused = isinstance(intermediate.intermediate_act_fn, FusedActivation)
        assert fused == hasattr(intermediate.dense, "fusable_activations")  # fused exactly where compressed
    assert any(isinstance(m, FusedActivation) for m in chosen.modules())


def test_record_is_updated_and_inputs_untouched(tuned, dense):
    before = json.dumps(tuned.adaptwin_record.to_dict(), sort_keys=True)
    small = select_layers(tuned, dense, keep_size=1.0)
    assert json.dumps(tuned.adaptwin_record.to_dict(), sort_keys=True) == before  # not inplace: a copy
    record = small.adaptwin_record
    assert record.modules == {} and record.sites == []
    assert all(row["reverted"] for row in record.finetune["layers"])
    sel = record.finetune["selection"]
    assert sel["keep_fraction"] == 1.0 and sorted(sel["reverted"]) == LAYERS
    with torch.inference_mode():  # everything reverted: the original model again, exactly
        a = small(**batches(1, seed=9)[0]).last_hidden_state
        b = dense(**batches(1, seed=9)[0]).last_hidden_state
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_partial_selection_record(tuned, dense):
    small = select_layers(tuned, dense, max_error=sorted(per_layer(tuned)[p]["error"] for p in LAYERS)[2])
    (gone,) = small.adaptwin_selection.reverted
    record = small.adaptwin_record
    assert not any(m.startswith(gone + ".") for m in record.modules)
    assert not any(r["path"].startswith(gone + ".") for r in record.sites)
    assert len(record.sites) == len(tuned.adaptwin_record.sites) - (3 if gone != "encoder.layer.0" else 1)
    assert {r["path"]: r["reverted"] for r in record.finetune["layers"]} == {p: p == gone for p in LAYERS}
    assert record.finetune["config"] == tuned.adaptwin_record.finetune["config"]
    # a second selection on the result accounts for the layer reverted before
    again = select_layers(small, dense, keep_size=1.0)
    assert again.adaptwin_record.finetune["selection"]["keep_fraction"] == 1.0
    assert sorted(again.adaptwin_record.finetune["selection"]["reverted"]) == LAYERS


def test_save_load_round_trip_is_exact(tuned, dense, tmp_path):
    small = select_layers(tuned, dense, max_error=sorted(per_layer(tuned)[p]["error"] for p in LAYERS)[1])
    adaptwin.save(small, tmp_path / "sel")
    loaded = adaptwin.load(tmp_path / "sel")
    inputs = batches(1, seed=7)[0]
    with torch.inference_mode():
        torch.testing.assert_close(loaded(**inputs).last_hidden_state, small(**inputs).last_hidden_state,
                                   rtol=0, atol=0)
    assert loaded.adaptwin_record.to_dict() == json.loads(json.dumps(small.adaptwin_record.to_dict()))
    # selecting from the saved run gives the same choice as from the live one ("one run, many sizes")
    sizes = per_layer(tuned)
    keep = (sum(s["after"] for s in sizes.values()) + 2 * sizes["encoder.layer.1"]["saved"]) / sum(
        s["before"] for s in sizes.values())
    live = plan_selection(tuned, dense, keep_size=keep).reverted
    reloaded = adaptwin.load(adaptwin.save(tuned, tmp_path / "all"))
    assert plan_selection(reloaded, dense, keep_size=keep).reverted == live


# ---------------------------------------------------------------------------------------------- refusing


@pytest.mark.parametrize("kwargs,message", [
    ({}, "give keep_size"),
    ({"keep_size": 0}, "keep_size must lie in (0, 1]"),
    ({"keep_size": 1.5}, "keep_size must lie in (0, 1]"),
    ({"keep_size": True}, "keep_size must lie in (0, 1]"),
    ({"max_error": -0.1}, "max_error must be a number >= 0"),
    ({"keep_size": 0.3}, "is below the"),
    ({"keep_size": 0.999, "max_error": 0.0}, "the budgets conflict"),
])
def test_impossible_budgets_are_refused(tuned, dense, kwargs, message):
    before = json.dumps(tuned.adaptwin_record.to_dict(), sort_keys=True)
    with pytest.raises(ValueError) as e:
        select_layers(tuned, dense, inplace=True, **kwargs)
    assert message in str(e.value)
    assert json.dumps(tuned.adaptwin_record.to_dict(), sort_keys=True) == before  # nothing reverted


def test_keep_size_below_all_compressed_names_the_floor(tuned, dense):
    total = tuned.adaptwin_record.summary()["total"]
    floor = total["params_after"] / total["params_before"]
    with pytest.raises(ValueError, match="nothing is reverted") as e:
        plan_selection(tuned, dense, keep_size=floor - 0.01)
    assert f"{floor:.4f}" in str(e.value)
    assert plan_selection(tuned, dense, keep_size=floor).reverted == []  # exactly the floor is allowed


def test_needs_fine_tuning_results_and_the_original(tuned, dense):
    plain = adaptwin.compress(dense, adaptwin.CompressionConfig(ratio=0.45))
    with pytest.raises(ValueError, match="compress with calibration"):
        select_layers(plain, dense, keep_size=0.8)
    with pytest.raises(ValueError, match="original must be the uncompressed model"):
        select_layers(tuned, plain, keep_size=0.8)


def test_an_original_with_other_weights_is_refused(tuned, dense, tmp_path):
    """Reverted layers are copied from ``original``: one of the same architecture with other weights (a user
    passing the wrong checkpoint) was taken silently. Also after save / load, where the checksums travel in the
    record; one re-read bit for bit passes."""
    other = copy.deepcopy(dense)
    with torch.no_grad():
        other.encoder.layer[1].output.dense.weight[0, 0] += 1e-3
    for model in (tuned, adaptwin.load(adaptwin.save(tuned, tmp_path / "t"))):
        with pytest.raises(ValueError, match="original's layer encoder.layer.1 is not the one this model was "
                                             "compressed from"):
            select_layers(model, other, keep_size=0.9)
        assert select_layers(model, copy.deepcopy(dense), keep_size=0.9).adaptwin_selection.reverted
