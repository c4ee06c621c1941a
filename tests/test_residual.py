"""The residual (ResidualTransformer) compressor: exactness, initialisation, sharing through save/load and
inspect, group-joint fine-tuning, accounting against stored bytes, and the combinations it refuses."""

from __future__ import annotations

import json
import math

import pytest
import tiny_models as tm
import torch

import adaptwin
from adaptwin import CompressionConfig, FinetuneConfig
from adaptwin.compressors.residual import ResidualConfig, ResidualLinear, residual_factors
from adaptwin.finetune.select import plan_selection
from adaptwin.io import read_tensor_layout

pytestmark = pytest.mark.usefixtures("one_thread")

D = 32  # tiny BERT / Whisper width: the full rank of every attention projection and FFN matrix


def residual(rank: int, k: int = 2, **options) -> CompressionConfig:
    return CompressionConfig(attention_rank=rank, ffn_rank=rank, attention_method="residual", ffn_method="residual",
                             method_options={"residual": {"group_size": k, **options}})


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def calibration(n: int = 4) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        mask = torch.ones(4, 9, dtype=torch.long)
        mask[0, 7:] = 0
        out.append({"input_ids": torch.randint(3, 100, (4, 9), generator=gen), "attention_mask": mask})
    return out


def shared_groups(model: torch.nn.Module) -> dict[int, list[str]]:
    groups: dict[int, list[str]] = {}
    for path, m in model.named_modules():
        if isinstance(m, ResidualLinear):
            groups.setdefault(id(m.shared), []).append(path)
    return groups


# ------------------------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("k", [1, 2])
def test_full_rank_is_exact_bert(k):
    """K = 1 (no sharing: S = W) and K = 2 at full rank reproduce the model to float32 rounding."""
    model, x = tm.bert(), tm.text_inputs()
    small = adaptwin.compress(model, residual(D, k))
    ref = model(**x).last_hidden_state
    # fp32 GEMMs of S plus a rank-32 correction vs one GEMM: a few ulps of the ~1-10 sized activations
    assert rel(small(**x).last_hidden_state, ref) < 1e-5
    assert len(shared_groups(small)) == (12 if k == 1 else 6)  # 2 layers x 6 matrices, or 6 shared pairs


def test_full_rank_is_exact_whisper_cross_attention():
    """Encoder, decoder self- and cross-attention (k_proj without bias) each form their own groups."""
    model, x = tm.whisper(), tm.whisper_inputs()
    small = adaptwin.compress(model, residual(D, 2))
    assert rel(small(**x).logits, model(**x).logits) < 1e-5
    paths = [sorted(g) for g in shared_groups(small).values()]
    assert ["model.decoder.layers.0.encoder_attn.k_proj", "model.decoder.layers.1.encoder_attn.k_proj"] in paths
    assert small.model.decoder.layers[0].encoder_attn.k_proj.bias is None


def test_k1_is_exact_at_any_rank():
    model, x = tm.bert(), tm.text_inputs()
    small = adaptwin.compress(model, residual(2, 1))
    assert rel(small(**x).last_hidden_state, model(**x).last_hidden_state) < 1e-5


# ------------------------------------------------------------------------------------------- initialisation


def test_alternating_init_beats_mean_on_shared_structure():
    """Matrices built as S + rank-4 + diag + small noise: alternating recovers most of it, the mean does not."""
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(48, 40, generator=gen, dtype=torch.float64)
    ws = [s + torch.randn(48, 4, generator=gen, dtype=torch.float64) @ torch.randn(4, 40, generator=gen,
                                                                                   dtype=torch.float64) * 2
          + 0.01 * torch.randn(48, 40, generator=gen, dtype=torch.float64) for _ in range(3)]
    naive = residual_factors(ws, [4, 4, 4], method="mean")
    alt = residual_factors(ws, [4, 4, 4], method="alternating", iterations=200, tol=1e-10)
    assert naive.error == naive.error_mean and alt.error_mean == pytest.approx(naive.error)
    # the mean keeps 1/3 of each layer's rank-4 term in S, so the residuals have rank 12 > 4; alternating moves
    # S back to the common part: measured 0.399 -> 0.0016 (138 sweeps; 0.0025 after the default 30)
    assert alt.error < 0.01 < 0.3 < naive.error
    num = 0.0
    for w, a, b, d in zip(ws, alt.lefts, alt.rights, alt.diags):  # the factors are what the error says
        assert a.shape == (48, 4) and b.shape == (40, 4) and d.shape == (40,)
        approx = alt.shared + a @ b.T
        approx[:40, :40] += torch.diag(d)
        num += float((w - approx).pow(2).sum())
    assert (num / sum(float(w.pow(2).sum()) for w in ws)) ** 0.5 == pytest.approx(alt.error, rel=1e-9)
    full = residual_factors(ws, [40, 40, 40])
    assert full.error < 1e-12


@pytest.mark.parametrize("diagonal", [True, False])
def test_alternating_never_worse_than_mean_on_model(diagonal):
    """Block-coordinate descent from the naive start cannot rise: on the tiny BERT's weights, per group."""
    model = tm.bert()
    small = adaptwin.compress(model, residual(3, 2, diagonal=diagonal))
    specs = [e["spec"] for e in small.adaptwin_record.modules.values()]
    assert len(specs) == 12
    for spec in specs:
        assert spec["init_error"]["alternating"] <= spec["init_error"]["mean"] + 1e-12
    naive = adaptwin.compress(model, residual(3, 2, diagonal=diagonal, init="mean"))
    for path, m in naive.named_modules():
        if isinstance(m, ResidualLinear):
            assert (m.diag is not None) == diagonal
            spec = naive.adaptwin_record.modules[path]["spec"]
            assert set(spec["init_error"]) == {"mean"}


def _correlated_group(seed: int = 0):
    """Three (48, 40) matrices with shared structure and per-layer inputs whose scales fall 100x over the
    directions (correlated activations, a different mixing per layer): weights, input Grams."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(48, 40, generator=gen, dtype=torch.float64)
    ws = [s + torch.randn(48, 6, generator=gen, dtype=torch.float64) @ torch.randn(6, 40, generator=gen,
                                                                                   dtype=torch.float64)
          for _ in range(3)]
    grams = []
    for _ in range(3):
        mix = torch.randn(40, 40, generator=gen, dtype=torch.float64) * torch.logspace(0, -2, 40, dtype=torch.float64)
        x = torch.randn(500, 40, generator=gen, dtype=torch.float64) @ mix.T  # (N, in)
        grams.append(x.T @ x)
    return ws, grams


def _errors(ws, grams, fac) -> tuple[float, float]:
    """(relative weight error, relative output error on the Grams' inputs) of ``fac``, computed from scratch."""
    wn = wd = on = od = 0.0
    for w, g, a, b, d in zip(ws, grams, fac.lefts, fac.rights, fac.diags):
        e = w - fac.shared - a @ b.T
        e[:40, :40] -= torch.diag(d)
        wn, wd = wn + float(e.pow(2).sum()), wd + float(w.pow(2).sum())
        on, od = on + float(torch.trace(e @ g @ e.T)), od + float(torch.trace(w @ g @ w.T))
    return (wn / wd) ** 0.5, (on / od) ** 0.5


def test_whitened_init_lowers_output_error():
    """With input Grams the descent minimises the output error: far below the weight-space fit's output error."""
    ws, grams = _correlated_group()
    plain = residual_factors(ws, [4, 4, 4])
    naive_w = residual_factors(ws, [4, 4, 4], method="mean", grams=grams)
    white = residual_factors(ws, [4, 4, 4], grams=grams)
    assert white.whitened and not plain.whitened
    assert white.error_mean == pytest.approx(naive_w.error) and white.error <= naive_w.error  # monotone descent
    w_plain, o_plain = _errors(ws, grams, plain)
    w_white, o_white = _errors(ws, grams, white)
    # the reported error is the output error (up to the 1e-6 ridge of gram_root)
    assert white.error == pytest.approx(o_white, rel=1e-4) and plain.error == pytest.approx(w_plain, rel=1e-9)
    # measured: output error 0.260 (weight-space alternating) -> 0.065 (whitened, 30 sweeps); the whitened fit
    # pays in weight error (0.27 -> 0.64) on the directions the inputs barely visit
    assert o_white < 0.5 * o_plain and w_white > w_plain
    assert residual_factors(ws, [40, 40, 40], grams=grams).error < 1e-9  # full rank: exact
    with pytest.raises(ValueError, match=r"grams must be one \(40, 40\) matrix per weight"):
        residual_factors(ws, [4, 4, 4], grams=grams[:2])


def test_whiten_finetune_init_on_model(tmp_path):
    """FinetuneConfig(init="whiten") fits the groups to the calibration inputs: lower output error of every
    residual matrix on them and of the model on other inputs; exact at full rank (the bias moves by 0)."""
    from benchmarks.residual_vs_adaptwin import input_grams, output_error, residual_paths

    model, x = tm.bert(), tm.text_inputs()
    calib = calibration()
    ft = FinetuneConfig(init="whiten", epochs=0, progress=False)
    plain = adaptwin.compress(model, residual(3, 2))
    white = adaptwin.compress(model, residual(3, 2), calibration=calib, finetune=ft)
    grams = input_grams(model, residual_paths(plain), calib)
    # measured: 0.581 (alternating) -> 0.142 (whitened) on the calibration inputs; model output on the
    # held-apart text_inputs 0.779 -> 0.256
    assert output_error(model, white, grams) < 0.5 * output_error(model, plain, grams)
    ref = model(**x).last_hidden_state
    assert rel(white(**x).last_hidden_state, ref) < 0.6 * rel(plain(**x).last_hidden_state, ref)
    for entry in white.adaptwin_record.modules.values():
        spec = entry["spec"]
        assert spec["init_error_of"] == "outputs" and spec["init_error"]["alternating"] <= spec["init_error"]["mean"]
    assert {e["spec"]["init_error_of"] for e in plain.adaptwin_record.modules.values()} == {"weights"}
    adaptwin.save(white, tmp_path / "w")  # the moved biases and the record's new fields round-trip
    torch.testing.assert_close(adaptwin.load(tmp_path / "w")(**x).last_hidden_state, white(**x).last_hidden_state,
                               rtol=0, atol=0)
    full = adaptwin.compress(model, residual(D, 2), calibration=calib, finetune=ft)
    assert rel(full(**x).last_hidden_state, ref) < 1e-5
    with pytest.raises(ValueError, match=r"init must be one of .* got 'whiten' \(the data-aware fit is chosen with "
                                         r"FinetuneConfig\(init='whiten'\)"):
        ResidualConfig(init="whiten")


def test_group_size_per_component_and_kind():
    cfg = ResidualConfig(group_size={"attention": 1, "encoder.ffn": 2, "default": 3})
    assert cfg.size("encoder", "attention") == 1 and cfg.size("encoder", "ffn") == 2
    assert cfg.size("decoder", "ffn") == 3
    model = tm.bert()
    small = adaptwin.compress(model, residual(4, {"attention": 1, "ffn": 2}))
    sizes = sorted(len(g) for g in shared_groups(small).values())
    assert sizes == [1] * 8 + [2, 2]  # 2 layers x 4 own attention matrices, 2 shared FFN pairs


# ----------------------------------------------------------------------------------- storage and inspection


def _state_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


@pytest.mark.parametrize("k", [1, 2])
def test_accounting_matches_stored_bytes(tmp_path, k):
    """Σ params_after of the record = elements stored for the replaced modules; the file holds nothing else new."""
    model = tm.bert()
    small = adaptwin.compress(model, residual(3, k))
    adaptwin.save(small, tmp_path / "s")
    layout = read_tensor_layout(tmp_path / "s")
    record = small.adaptwin_record
    summary = record.summary()["total"]
    stored = [v for name, v in layout.items() if any(name.startswith(p + ".") for p in record.modules)]
    assert sum(b for _, _, b in stored) == 4 * summary["params_after"]  # float32
    assert sum(math.prod(s) for _, s, _ in stored) == summary["params_after"]
    assert sum(b for _, _, b in layout.values()) == (_state_bytes(model) - 4 * summary["params_before"]
                                                     + 4 * summary["params_after"])
    # the plan predicts the same counts without building anything
    assert adaptwin.plan(model, residual(3, k)).summary()["total"] == summary


def test_save_load_keeps_one_shared_copy(tmp_path):
    model, x = tm.bert(), tm.text_inputs()
    small = adaptwin.compress(model, residual(3, 2))
    adaptwin.save(small, tmp_path / "s")
    layout = read_tensor_layout(tmp_path / "s")
    shared = sorted(n for n in layout if n.endswith(".shared"))
    assert all(".layer.0." in n for n in shared) and len(shared) == 6  # layer 1 stores none of its own
    meta = adaptwin.read_meta(tmp_path / "s")
    assert meta["aliases"]["encoder.layer.1.intermediate.dense.shared"] == "encoder.layer.0.intermediate.dense.shared"
    # the bytes on disk: one copy, i.e. 6 shared matrices fewer than storing every layer's
    again = sum(b for n, (_, _, b) in layout.items() if n.endswith(".shared"))
    assert again == 4 * (4 * D * D + D * 64 + 64 * D)
    loaded = adaptwin.load(tmp_path / "s")
    a, b = loaded.encoder.layer[0], loaded.encoder.layer[1]
    assert a.attention.self.query.shared is b.attention.self.query.shared
    assert a.output.dense.shared is b.output.dense.shared
    assert a.attention.self.query.shared is not a.attention.self.key.shared
    torch.testing.assert_close(loaded(**x).last_hidden_state, small(**x).last_hidden_state, rtol=0, atol=0)


def test_inspect_shows_sharing(tmp_path, capsys):
    from adaptwin.cli import inspect_data, main

    small = adaptwin.compress(tm.bert(), residual(3, 2))
    adaptwin.save(small, tmp_path / "s")
    data = inspect_data(tmp_path / "s")
    rows = {r["stored"]: r["also"] for r in data["shared"]}
    assert rows["encoder.layer.0.attention.self.value.shared"] == ["encoder.layer.1.attention.self.value.shared"]
    assert len(rows) == 6
    # the owner's module row carries S; the other's bytes are its own factors only
    mods = {m["path"]: m for m in data["modules"]}
    assert mods["encoder.layer.0.attention.self.query"]["params"] - mods["encoder.layer.1.attention.self.query"][
        "params"] == D * D
    assert main(["inspect", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "shared tensors" in out and "encoder.layer.1.attention.self.value.shared" in out
    assert json.loads(json.dumps(data))["shared"]  # JSON-able for --json


# --------------------------------------------------------------------------------------------- fine-tuning


def test_group_finetuning_lowers_error_and_keeps_sharing(tmp_path):
    model, x = tm.bert(), tm.text_inputs()
    cfg = residual(4, 2)
    before = adaptwin.compress(model, cfg)
    small = adaptwin.compress(model, cfg, calibration=calibration(),
                              finetune=FinetuneConfig(epochs=15, holdout=0.25, progress=False))
    report = small.adaptwin_finetune
    assert [r.path for r in report.layers] == ["encoder.layer.0+encoder.layer.1"]  # one joint unit
    r = report.layers[0]
    assert r.error_after < 0.8 * r.error_before  # measured 0.577 -> 0.284 (held-out batch)
    ref = model(**x).last_hidden_state
    assert rel(small(**x).last_hidden_state, ref) < rel(before(**x).last_hidden_state, ref)
    q0, q1 = small.encoder.layer[0].attention.self.query, small.encoder.layer[1].attention.self.query
    assert q0.shared is q1.shared
    assert not torch.equal(q0.shared, before.encoder.layer[0].attention.self.query.shared)  # S was trained
    assert not small.training and not small.encoder.layer[0].training  # eval mode restored (dropout off)
    adaptwin.save(small, tmp_path / "s")
    loaded = adaptwin.load(tmp_path / "s")
    torch.testing.assert_close(loaded(**x).last_hidden_state, small(**x).last_hidden_state, rtol=0, atol=0)


def test_group_finetuning_resumes_from_run_dir(tmp_path):
    model, x = tm.bert(), tm.text_inputs()
    ft = FinetuneConfig(epochs=3, holdout=0.25, progress=False, run_dir=str(tmp_path / "run"))
    first = adaptwin.compress(model, residual(4, 2), calibration=calibration(), finetune=ft)
    assert (tmp_path / "run" / "layers" / "encoder.layer.0_encoder.layer.1.safetensors").exists()
    again = adaptwin.compress(model, residual(4, 2), calibration=calibration(), finetune=ft)
    assert again.adaptwin_finetune.resumed == ["encoder.layer.0+encoder.layer.1"]
    torch.testing.assert_close(again(**x).last_hidden_state, first(**x).last_hidden_state, rtol=0, atol=0)
    assert again.encoder.layer[0].output.dense.shared is again.encoder.layer[1].output.dense.shared


def test_select_layers_chooses_residual_groups_whole():
    """A residual group is fine-tuned as one unit with one error, so `select_layers` keeps or reverts it whole
    (it used to stop at "layer encoder.layer.0 ... has no fine-tuning result")."""
    model, x = tm.bert(), tm.text_inputs()
    group = "encoder.layer.0+encoder.layer.1"
    tuned = adaptwin.compress(model, residual(4, 2), calibration=calibration(),
                              finetune=FinetuneConfig(epochs=1, holdout=0.25, progress=False))
    plan = plan_selection(tuned, model, keep_size=1.0)
    assert [c.path for c in plan.layers] == [group]
    total = tuned.adaptwin_record.summary()["total"]
    assert plan.layers[0].params_before == total["params_before"] and plan.layers[0].saved > 0
    kept = adaptwin.select_layers(tuned, model, max_error=1e9)  # every error is below: nothing reverted
    assert kept.adaptwin_selection.reverted == [] and len(kept.adaptwin_record.modules) == 12
    back = adaptwin.select_layers(tuned, model, keep_size=1.0)
    assert back.adaptwin_selection.reverted == [group]
    assert not back.adaptwin_record.modules and not back.adaptwin_record.sites
    assert [r["reverted"] for r in back.adaptwin_record.finetune["layers"]] == [True]
    torch.testing.assert_close(back(**x).last_hidden_state, model(**x).last_hidden_state, rtol=0, atol=0)
    broken = adaptwin.select_layers(tuned, model, max_error=1e9)  # a record with one member's modules gone
    broken.adaptwin_record.modules = {k: v for k, v in broken.adaptwin_record.modules.items()
                                      if not k.startswith("encoder.layer.1.")}
    with pytest.raises(ValueError, match=r"fine-tuned as one group 'encoder.layer.0\+encoder.layer.1' .* kept or "
                                         r"reverted together, but \['encoder.layer.1'\]"):
        adaptwin.select_layers(broken, model, keep_size=1.0)


def test_residual_ffn_with_product_twin_attention():
    """Supported composition: shared FFN + product-twin attention, fine-tuned (the FFN pair jointly)."""
    model, x = tm.bert(), tm.text_inputs()
    cfg = CompressionConfig(attention_rank=8, ffn_rank=D, ffn_method="residual",
                            method_options={"residual": {"group_size": 2}})
    small = adaptwin.compress(model, cfg)
    kinds = {e["compressor"] for e in small.adaptwin_record.modules.values()}
    assert kinds == {"product_twin", "residual"}
    assert rel(small(**x).last_hidden_state, model(**x).last_hidden_state) < 1e-5  # rank 8 = head_dim: exact
    tuned = adaptwin.compress(model, CompressionConfig(attention_rank=4, ffn_rank=4, ffn_method="residual"),
                              calibration=calibration(), finetune=FinetuneConfig(epochs=2, progress=False))
    assert [r.path for r in tuned.adaptwin_finetune.layers] == ["encoder.layer.0+encoder.layer.1"]


# ---------------------------------------------------------------------------------------- refused settings


@pytest.mark.parametrize("kwargs, match", [
    ({"quantization": "nf4"}, "does not combine with quantization"),
    ({"method_options": {"residual": {"group_size": 0}}}, "group_size"),
    ({"method_options": {"residual": {"group_size": {"encoder.bogus": 2}}}}, "group_size key"),
    ({"method_options": {"residual": {"init": "svd"}}}, "init must be one of"),
    ({"method_options": {"residual": {"groups": 2}}}, "unknown residual options"),
    ({"overrides": {"encoder.layer.1.*": {"ffn_rank": None, "attention_rank": None}}}, "form one group"),
])
def test_refused_configurations(kwargs, match):
    base = {"attention_rank": 4, "ffn_rank": 4, "attention_method": "residual", "ffn_method": "residual"}
    with pytest.raises(ValueError, match=match):
        adaptwin.compress(tm.bert(), CompressionConfig(**{**base, **kwargs}))


def test_refused_ratio_sequential_and_fused_attention():
    model = tm.bert()
    with pytest.raises(ValueError, match="needs explicit ranks"):
        adaptwin.plan(model, CompressionConfig(ratio=0.3, ffn_method="residual"))
    with pytest.raises(ValueError, match="sequential fine-tuning"):
        adaptwin.compress(model, residual(4, 2), calibration=calibration(2),
                          finetune=FinetuneConfig(epochs=1, sequential=True, progress=False))
    with pytest.raises(ValueError, match="not .*separate nn.Linear|are not"):  # GPT-2 fuses q/k/v in c_attn
        adaptwin.compress(tm.gpt2(), CompressionConfig(attention_rank=4, attention_method="residual"))
    with pytest.raises(ValueError, match="use adaptwin.compress"):
        site = adaptwin.get_architecture("bert").ffn_sites(model)[0]
        adaptwin.get_compressor("residual").compress(site, 4, 0, residual(4), None)
    with pytest.raises(ValueError, match="method_options must be a dict"):
        CompressionConfig(ffn_rank=4, method_options={"residual": 2})


def test_config_round_trips_with_options():
    cfg = residual(4, {"attention": 3, "ffn": 2}, diagonal=False)
    assert CompressionConfig.from_dict(json.loads(cfg.to_json())) == cfg
