"""The battery every architecture adapter must pass, one parametrised row per family (tests/tiny_models.py).
Rank-space computation and grouped-query attention: tests/test_rank_space.py.

Tolerances. "Exact" means a relative Frobenius error of at most 1e-5 in fp32 (EXACT_REL): the factors are
computed in fp64 and rounded to fp32 once (relative 6e-8 per entry), and rank space sums the same
products in another order, so the measured full-rank error through two layers is 2e-7..8e-7 on every
row; 1e-5 keeps a >10x margin while any real mistake (a dropped bias, a wrong scale, a transposed head)
costs more than 1e-2 here, because the weights are re-initialised with std 0.2-0.3.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import (
    EXACT_REL,
    ROW_BY_NAME,
    ROWS,
    Row,
    attention_sites,
    full_rank,
    layout,
    original,
    reference,
    rel_err,
    run,
    twin_modules,
)
from torch import nn

import adaptwin

rows = pytest.mark.parametrize("row", ROWS, ids=lambda r: r.name)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_builtin_architecture_has_a_row() -> None:
    # A built-in adapter (or a model type added to one) without a row would skip the whole battery.
    builtin = {t for t in adaptwin.list_architectures()
               if type(adaptwin.get_architecture(t)).__module__.startswith("adaptwin.architectures.")}
    assert builtin <= set(ROW_BY_NAME), f"no tiny model for {sorted(builtin - set(ROW_BY_NAME))}"
    assert all(original(row.name).config.model_type == row.name for row in ROWS)


@rows
def test_layer_stacks_are_the_same_before_and_after_compression(row: Row) -> None:
    # contiguous_layer_inputs finds the stacks in compressed models, whose attention modules no longer have
    # the attributes the site lists read; the default (from layer_paths) needs the original modules.
    model = original(row.name)
    adapter = adaptwin.get_architecture(row.name)
    stacks = adapter.layer_stacks(model)
    assert set(stacks) == set(adapter.components)
    expected = {c: sorted({p.rsplit(".", 1)[0] for p, cc in adapter.layer_paths(model) if cc == c}) for c in stacks}
    assert {c: [p] for c, p in stacks.items()} == expected
    small = adaptwin.compress(model, adaptwin.CompressionConfig(ratio=0.5, twins=row.twins))
    assert adapter.layer_stacks(small) == stacks
    assert all(isinstance(small.get_submodule(p), nn.ModuleList) for p in stacks.values())


# --------------------------------------------------------------------------------------- 1. full-rank exact

@rows
@pytest.mark.parametrize("lora", [0, 2], ids=["lora0", "lora2"])
def test_full_rank_is_exact(row: Row, lora: int) -> None:
    # LoRA's partner factor starts at zero, so concatenating it must not move the output either.
    small = adaptwin.compress(original(row.name), full_rank(row, lora))
    assert twin_modules(small), "no attention module was replaced"
    assert rel_err(run(row, small), reference(row.name)) <= EXACT_REL


# -------------------------------------------------------------------------------- 2. error falls with rank

@rows
@pytest.mark.parametrize("kind", ["attention", "ffn"])
def test_error_falls_with_rank(row: Row, kind: str) -> None:
    fractions = (1 / 8, 1 / 4, 1 / 2, 3 / 4, 1)
    errors = []
    for f in fractions:
        if kind == "attention":
            cfg = adaptwin.CompressionConfig(attention_rank=max(1, round(f * row.head_dim)), twins=row.twins)
        else:
            cfg = adaptwin.CompressionConfig(ffn_rank=round(f * row.d_model), twins=row.twins)
        errors.append(rel_err(run(row, adaptwin.compress(original(row.name), cfg)), reference(row.name)))
    assert all(a > b for a, b in zip(errors, errors[1:])), f"error does not fall with rank: {errors}"
    # Measured at 1/8 of the full rank: 0.64..1.2 for attention, 0.77..1.2 for the FFN on these rows; a
    # floor of 0.05 proves the low-rank model is really lossy (a no-op compression would read ~1e-7).
    assert errors[0] > 0.05
    assert errors[-1] <= EXACT_REL


# ------------------------------------------------------------------------------ 3. the original is untouched

@rows
def test_original_untouched(row: Row) -> None:
    model = original(row.name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = {n: type(m) for n, m in model.named_modules()}
    cfg = adaptwin.CompressionConfig(attention_rank=row.head_dim // 2, attention_lora_rank=1,
                                     ffn_rank=row.d_model // 2, ffn_lora_rank=1, twins=row.twins)
    small = adaptwin.compress(model, cfg)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "compress changed the original's tensors"
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert not twin_modules(model) and twin_modules(small)
    assert getattr(model, "adaptwin_record", None) is None
    # Nothing is shared either: training the compressed copy must not reach back into the original.
    originals = {p.data_ptr() for p in model.parameters()}
    assert not any(p.data_ptr() in originals for p in small.parameters())


# ------------------------------------------------------------------------------------ 4. save/load round trip

@rows
def test_save_load_round_trip(row: Row, tmp_path) -> None:
    # A lossy rank with LoRA, so the round trip carries non-trivial factors and the LoRA split.
    cfg = adaptwin.CompressionConfig(attention_rank=row.head_dim // 2, attention_lora_rank=1,
                                     ffn_rank=row.d_model // 2, ffn_lora_rank=2, twins=row.twins)
    small = adaptwin.compress(original(row.name), cfg)
    adaptwin.save(small, tmp_path / row.name)
    same = adaptwin.load(tmp_path / row.name)
    # Same tensors, same modules, same kernels on the same CPU: the outputs must be bit-identical.
    assert (run(row, same) - run(row, small)).abs().max().item() == 0
    assert same.adaptwin_record.to_dict() == small.adaptwin_record.to_dict()
    assert layout(same) == layout(small)
    if row.generate is not None:
        with torch.no_grad():
            assert torch.equal(row.generate(same).sequences, row.generate(small).sequences)


def test_save_load_keeps_generation_config_and_attention_implementation(tmp_path) -> None:
    # A checkpoint's generation config (Whisper's language/task tokens) is not derivable from its model
    # config, and an eager model must stay eager: its uncompressed modules (here the decoder) would
    # otherwise run SDPA after loading and stop returning attention probabilities.
    model = copy.deepcopy(original("whisper", "eager"))
    model.generation_config.lang_to_id = {"<|en|>": 60}
    model.generation_config.no_timestamps_token_id = 63
    small = adaptwin.compress(model, adaptwin.CompressionConfig(attention_rank=4, components=("encoder",)))
    adaptwin.save(small, tmp_path / "whisper")
    same = adaptwin.load(tmp_path / "whisper")
    assert same.generation_config.to_dict() == small.generation_config.to_dict()
    assert same.config._attn_implementation == "eager"
    row = ROW_BY_NAME["whisper"]
    with torch.no_grad():
        ref, out = small(**row.inputs(), output_attentions=True), same(**row.inputs(), output_attentions=True)
    for key in ("encoder_attentions", "decoder_attentions", "cross_attentions"):
        assert len(out[key]) == len(ref[key]) == 2, key
        assert all(torch.equal(a, b) for a, b in zip(out[key], ref[key]))


# ------------------------------------------------------------------------------------------- 5. generation

def assert_same_generation(ref, out) -> None:
    assert torch.equal(out.sequences, ref.sequences), f"{out.sequences.tolist()} != {ref.sequences.tolist()}"
    assert len(out.scores) == len(ref.scores)
    scale = max(s[s.isfinite()].abs().max().item() for s in ref.scores)
    for a, b in zip(out.scores, ref.scores):
        # Per-step logits carry the forward pass's error (EXACT_REL relative, measured 1e-6) through
        # at most 10 cached steps; suppressed tokens are -inf in both (assert_close matches infinities).
        torch.testing.assert_close(a, b, rtol=0, atol=EXACT_REL * scale)


@pytest.mark.parametrize("row", [r for r in ROWS if r.generate is not None], ids=lambda r: r.name)
def test_generate_matches_at_full_rank(row: Row) -> None:
    model = original(row.name)
    small = adaptwin.compress(model, full_rank(row))
    components = {s["component"] for s in small.adaptwin_record.sites}
    assert components == set(adaptwin.get_architecture(row.name).components)  # Whisper: encoder AND decoder
    with torch.no_grad():
        ref, out = row.generate(model), row.generate(small)
    new = ref.sequences[:, -len(ref.scores):]
    # Guard the test's meaning: a model stuck on one token would make equality trivial.
    assert len(set(new.flatten().tolist())) >= 4, f"degenerate tiny model: {new.tolist()}"
    assert_same_generation(ref, out)


NARROW = (4, 1)  # rank, LoRA rank of `narrow_twins`: r + l = 5 < head_dim 8


def narrow_twins(row: Row, seed: int) -> torch.nn.Module:
    """The row's model with every twin at r + l = 5 (narrower than d_h = 8, so a rank-space cache shows) and
    its factors moved off the SVD (as after fine-tuning: the LoRA factors no longer cancel)."""
    small = adaptwin.compress(original(row.name), adaptwin.CompressionConfig(
        attention_rank=NARROW[0], attention_lora_rank=NARROW[1], twins=row.twins))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tw in twin_modules(small).values():
            for p in tw.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return small


@pytest.mark.parametrize("row", [r for r in ROWS if r.generate is not None], ids=lambda r: r.name)
def test_rank_space_cache_matches_no_cache(row: Row) -> None:
    # At full rank the cache is d_h wide either way; only a narrower width (r + l = 5 < 8) shows that the
    # cache really holds rank-space keys/values and that cached decoding reads them back correctly.
    (r, lora), small = NARROW, narrow_twins(row, 14)
    with torch.no_grad():
        cache = small(**row.inputs(), use_cache=True).past_key_values
    self_cache = getattr(cache, "self_attention_cache", cache)
    keys, values = self_cache.layers[0].keys, self_cache.layers[0].values
    assert values.shape[-1] == r + lora
    assert keys.shape[-1] == (r + lora if "qk" in row.twins else row.head_dim)
    if hasattr(cache, "cross_attention_cache"):
        assert cache.cross_attention_cache.layers[0].values.shape[-1] == r + lora

    with torch.no_grad():
        ref, out = row.generate(small, use_cache=True), row.generate(small, use_cache=False)
    assert_same_generation(ref, out)


@pytest.mark.parametrize("row", [r for r in ROWS if r.generate is not None], ids=lambda r: r.name)
def test_static_cache_matches_the_dynamic_one(row: Row) -> None:
    """A preallocated cache (``StaticCache``, what ``cache_implementation="static"`` and compiled decoding use):
    its layers are allocated at the maximum length on their first update, written in place, and hand attention
    the unwritten positions too, which the attention mask hides. The compressed model's cache must come out
    rank-space wide and decode as the dynamic cache does."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache, StaticCache

    (r, lora), length, small = NARROW, 32, narrow_twins(row, 15)
    static = StaticCache(config=small.config, max_cache_len=length)
    cache = EncoderDecoderCache(static, DynamicCache()) if row.name == "whisper" else static
    with torch.no_grad():
        ref, out = row.generate(small), row.generate(small, past_key_values=cache)
    layer = static.layers[0]
    assert type(layer).__name__ == "StaticLayer" and layer.values.shape[-2:] == (length, r + lora)
    assert layer.keys.shape[-1] == (r + lora if "qk" in row.twins else row.head_dim)
    assert_same_generation(ref, out)


@pytest.mark.parametrize("row", [r for r in ROWS if r.generate is not None], ids=lambda r: r.name)
def test_beam_search_reorders_the_rank_space_cache(row: Row) -> None:
    """Beam search (3 beams) reorders the cache's rows at every step: at full rank it gives the dense model's
    sequences, and with a rank-space cache (r + l = 5 < 8, LoRA moved off zero) the same as without a cache."""
    def beams(model, **kwargs):
        return row.generate(model, num_beams=3, **kwargs).sequences

    model, small = original(row.name), narrow_twins(row, 3)
    with torch.no_grad():
        dense = beams(model)
        assert len(set(dense[:, -10:].flatten().tolist())) >= 4, f"degenerate tiny model: {dense.tolist()}"
        assert torch.equal(beams(adaptwin.compress(model, full_rank(row))), dense)
        assert torch.equal(beams(small), beams(small, use_cache=False))


@pytest.mark.parametrize("keyword", ["cache", "past_key_values"])
def test_twin_attention_takes_the_cache_under_either_name(keyword: str) -> None:
    """transformers >= 5.2x passes the cache to attention modules as ``cache``, 5.17-5.1x as
    ``past_key_values``: a compressed module must update (and read) it under either name."""
    from transformers.cache_utils import DynamicCache

    small = adaptwin.compress(original("gpt2"), adaptwin.CompressionConfig(attention_rank=2, attention_lora_rank=1))
    attn = next(iter(twin_modules(small).values()))
    x = torch.randn(1, 3, attn.q_proj.in_features, generator=torch.Generator().manual_seed(3))
    cache = DynamicCache()
    with torch.no_grad():
        first, _ = attn(x[:, :2], **{keyword: cache})
        assert cache.layers[attn.layer_idx].keys.shape[-2] == 2  # the module wrote its keys into the cache
        second, _ = attn(x[:, 2:], **{keyword: cache})
        assert cache.layers[attn.layer_idx].keys.shape[-2] == 3
        whole, _ = attn(x, attention_mask=None)
    # the cached step attends to the two cached keys (GPT-2's attention is causal): as the whole sequence
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, rtol=1e-5, atol=1e-6)


def test_whisper_cross_attention_is_compressed() -> None:
    small = adaptwin.compress(original("whisper"), full_rank(ROW_BY_NAME["whisper"]))
    paths = set(twin_modules(small))
    assert any(p.endswith("encoder_attn") for p in paths)
    assert any(".encoder." in p for p in paths) and any(".decoder." in p and "self_attn" in p for p in paths)


# ------------------------------------------------------------------------------------ 6. bias folding

def test_biases_fold_exactly() -> None:
    """Large query/key/value biases: the key bias is dropped, the query bias kept in the homogeneous
    row, the value bias folded into the output bias, and the full-rank output is still exact."""
    row = ROW_BY_NAME["bert"]
    model = copy.deepcopy(original("bert"))
    gen = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for site in attention_sites(model):
            for lin in (site.q, site.k, site.v):
                lin.bias.copy_(3.0 * torch.randn(lin.bias.shape, generator=gen))  # 15x the weights' std
    ref = run(row, model)

    # The query and value biases matter (so folding them is tested, not ignored): dropping either
    # moves the output by far more than EXACT_REL.
    for which in ("q", "v"):
        ablated = copy.deepcopy(model)
        with torch.no_grad():
            for site in attention_sites(ablated):
                getattr(site, which).bias.zero_()
        assert rel_err(run(row, ablated), ref) > 1e-2

    small = adaptwin.compress(model, full_rank(row))
    for site in attention_sites(model):
        tw = small.get_submodule(site.path)
        assert tw.k_proj.bias is None  # q·b_K is constant over keys; softmax ignores it
        assert tw.q_proj.bias is not None and tw.q_proj.bias.abs().max() > 0
        assert tw.v_proj.bias is None  # folded into the output bias (softmax rows sum to 1)
        assert small.get_submodule(site.out_path).bias is not None
    assert rel_err(run(row, small), ref) <= EXACT_REL


# -------------------------------------------------------------------------------------------- 7. scaling

@rows
def test_scaling_is_the_original(row: Row) -> None:
    model = original(row.name)
    small = adaptwin.compress(model, adaptwin.CompressionConfig(attention_rank=2, twins=row.twins))
    for path, tw in twin_modules(small).items():
        assert tw.scaling == model.get_submodule(path).scaling  # never 1/sqrt(r + l)


def test_gpt2_residual_dropout_is_kept_in_training() -> None:
    # GPT-2 applies resid_dropout inside its attention module, after c_proj; the replacement must too,
    # or layer-wise fine-tuning trains a different function. With p = 1 the attention branch is
    # exactly zero in the original, so the train-mode outputs must match without any RNG alignment.
    row = ROW_BY_NAME["gpt2"]
    model = copy.deepcopy(original("gpt2"))
    for name, module in model.named_modules():  # every other dropout off: the outputs are deterministic
        if isinstance(module, nn.Dropout):
            module.p = 1.0 if name.endswith("attn.resid_dropout") else 0.0
    small = adaptwin.compress(model, full_rank(row))
    model.train(), small.train()
    assert rel_err(run(row, small), run(row, model)) <= EXACT_REL


# ------------------------------------------------------------------------------------- 10. output_attentions

@pytest.mark.parametrize("name", ["bert", "whisper"])  # padding mask; encoder, decoder and cross attention
def test_output_attentions_eager(name: str) -> None:
    row = ROW_BY_NAME[name]
    model = original(name, "eager")
    with torch.no_grad():
        # First, so HF installs its capture hooks on the original's modules; compress deep-copies them,
        # and the copy must still record each layer once (a replaced module carries no hook).
        ref = model(**row.inputs(), output_attentions=True)
        small = adaptwin.compress(model, full_rank(row))
        out = small(**row.inputs(), output_attentions=True)
    keys = [k for k in ("attentions", "encoder_attentions", "decoder_attentions", "cross_attentions")
            if ref.get(k)]
    assert keys
    for key in keys:
        assert len(out[key]) == len(ref[key]), key
        for a, b in zip(out[key], ref[key]):
            assert a.shape == b.shape
            # Probabilities: an fp32 softmax row of n <= 25 entries sums to 1 within ~n·6e-8 = 1.5e-6.
            torch.testing.assert_close(a.sum(-1), torch.ones_like(a.sum(-1)), rtol=0, atol=1e-5)
            assert rel_err(a, b) <= EXACT_REL
    if name == "bert":  # the padded keys of the second sequence get no probability
        mask = row.inputs()["attention_mask"]
        assert all(a[1, :, :, mask[1] == 0].abs().max() == 0 for a in out["attentions"])


# ------------------------------------------------------------------------------------ 11. rotary forbids QK

@pytest.mark.parametrize("inplace", [False, True])
def test_qk_twin_on_rotary_model_is_refused(inplace: bool) -> None:
    model = copy.deepcopy(original("llama")) if inplace else original("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"rotary.*twins=\('vo',\)"):
        adaptwin.compress(model, adaptwin.CompressionConfig(attention_rank=4), inplace=inplace)
    assert not twin_modules(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert getattr(model, "adaptwin_record", None) is None


def test_llama_rotary_is_llamas_own_imported_on_first_use() -> None:
    """`import adaptwin` imports nothing of transformers (it took 2.4 of the import's 4.3 s, 1.5 of them for
    Llama's modeling module, `python -X importtime`); the Llama adapter's rotary is Llama's own, fetched on
    the first call, and TwinAttention reads transformers' cache and capture modules only where loaded."""
    import subprocess
    import sys

    code = ("import sys, adaptwin; import adaptwin.architectures.llama as L; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'), L._llama_rotary is None)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["[]", "True"], proc.stdout
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_rotary

    from adaptwin.architectures import llama

    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 5, 8, generator=gen), torch.randn(1, 1, 5, 8, generator=gen)
    cos, sin = torch.randn(1, 5, 8, generator=gen), torch.randn(1, 5, 8, generator=gen)
    for got, want in zip(llama.apply_rotary_pos_emb(q, k, cos, sin), llama_rotary(q, k, cos, sin)):
        assert torch.equal(got, want)
    assert llama._llama_rotary is llama_rotary
