"""CompressionConfig validation and the rank planner's arithmetic (no models needed)."""

import json

import pytest

from adaptwin.config import CompressionConfig, PlanItem, plan_ranks


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ratio": 0.0}, "strictly between 0 and 1"),
        ({"ratio": 1.0}, "strictly between 0 and 1"),
        ({"ratio": -0.2}, "strictly between 0 and 1"),
        ({"ratio": "0.4"}, "must be a number"),
        ({"ratio": True}, "must be a number"),
        ({"ratio": 0.4, "attention_rank": 8}, "either ratio or explicit ranks"),
        ({}, "nothing to compress"),
        ({"attention_rank": 0}, "attention_rank must be >= 1"),
        ({"attention_rank": 2.5}, "whole number"),
        ({"ffn_rank": 8, "ffn_lora_rank": -1}, "ffn_lora_rank must be >= 0"),
        ({"attention_lora_rank": 4, "ffn_rank": 8}, "attention_lora_rank needs attention_rank"),
        ({"ratio": 0.4, "twins": ("qk", "kv")}, "twins must be a non-empty subset"),
        ({"ratio": 0.4, "twins": ()}, "twins must be a non-empty subset"),
        ({"ratio": 0.4, "components": ()}, "at least one component"),
        ({"ratio": 0.4, "overrides": {"*": {"rank": 3}}}, "unknown key 'rank'"),
        ({"ratio": 0.4, "overrides": {"*": {}}}, "must map some of"),
        ({"ratio": 0.4, "overrides": {"*": {"ffn_rank": 0}}}, "must be >= 1"),
        ({"ratio": 0.4, "attention_lora_fraction": 1.0}, "attention_lora_fraction"),
        ({"ratio": 0.4, "width_multiple": 0}, r"width_multiple must be a whole number in 1..256, got 0"),
        ({"ratio": 0.4, "width_multiple": 8.0}, "width_multiple must be a whole number"),
        ({"ratio": 0.4, "width_multiple": True}, "width_multiple must be a whole number"),
        ({"ratio": 0.4, "width_multiple": 512}, "width_multiple must be a whole number"),
        ({"ffn_rank": 8, "width_multiple": 8}, "width_multiple applies to ranks planned from ratio"),
        ({"ratio": 0.4, "seed": "a"}, r"seed must be a whole number in \[0, 2\*\*63\), got 'a'"),
        ({"ratio": 0.4, "seed": 1.5}, "seed must be a whole number"),
        ({"ratio": 0.4, "seed": -1}, "seed must be a whole number"),
        ({"ratio": 0.4, "attention_factor": "x"}, "attention_factor must be a number, got 'x'"),
    ],
)
def test_bad_config_names_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CompressionConfig(**kwargs)


def test_config_round_trips_through_json():
    cfg = CompressionConfig(attention_rank=16, attention_lora_rank=4, ffn_rank=160, ffn_lora_rank=16,
                            components=("encoder",), overrides={"*.layers.0.*": {"ffn_rank": None}})
    again = CompressionConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg and CompressionConfig.from_json(cfg.to_json()) == cfg
    from adaptwin import FinetuneConfig

    ft = FinetuneConfig(epochs=3, mode="spectral", init="whiten")
    assert FinetuneConfig.from_json(ft.to_json()) == ft
    for cls in (CompressionConfig, FinetuneConfig):
        with pytest.raises(ValueError, match=f"a {cls.__name__} is stored as a JSON object; could not parse it"):
            cls.from_json("{ratio: 0.4")
    with pytest.raises(ValueError, match="unknown CompressionConfig fields"):
        CompressionConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def _items(n_layers=4, d=384, heads=6, ffn=1536, component="encoder"):
    dh = d // heads
    att = lambda r, lora: 4 * d * heads * (r + lora) + heads * (r + lora) + d  # noqa: E731  q,k,v,o + biases
    fc = lambda r, lora, i, o: (r + lora) * (i + o) + o  # noqa: E731
    items = []
    for i in range(n_layers):
        items.append(PlanItem(f"{component}.{i}.attn", component, "attention", dh, 4 * d * d + 3 * d, att))
        items.append(PlanItem(f"{component}.{i}.fc1", component, "ffn", d, d * ffn + ffn,
                              lambda r, lora: fc(r, lora, d, ffn)))
        items.append(PlanItem(f"{component}.{i}.fc2", component, "ffn", d, d * ffn + d,
                              lambda r, lora: fc(r, lora, ffn, d)))
    return items


@pytest.mark.parametrize("ratio", [0.2, 0.35, 0.45, 0.5, 0.6])
def test_ratio_plan_hits_target_with_paper_split(ratio):
    items = _items() + _items(component="decoder")
    plan = plan_ranks(CompressionConfig(ratio=ratio), items)
    for component in ("encoder", "decoder"):
        group = [it for it in items if it.component == component]
        before = sum(it.params_before for it in group)
        after = sum(it.params_at(*plan[it.name]) for it in group)
        # The plan's granularity is one FFN rank step (0.1 % of the component here): 1 % is the promise.
        assert abs((1 - after / before) - ratio) < 0.01
        att = [it for it in group if it.kind == "attention"]
        ffn = [it for it in group if it.kind == "ffn"]
        r_a, l_a = plan[att[0].name]
        r_f, l_f = plan[ffn[0].name]
        c_a = 1 - (r_a + l_a) / att[0].full_rank
        c_f = 1 - (r_f + l_f) * (384 + 1536) / (384 * 1536)
        # attention removes ~0.7x what the FFN removes (rounding of the 64-wide heads: ±1/64)
        assert abs(c_a - 0.7 * c_f) < 1.5 / 64 + 0.02
        assert round((r_a + l_a) / 5) == l_a  # 4:1 spectral:LoRA
        assert round((r_f + l_f) / 10) == l_f  # 9:1


@pytest.mark.parametrize("multiple", [8, 16])
@pytest.mark.parametrize("factor", [0.7, 1.0])
def test_width_multiple_rounds_every_width_and_keeps_the_ratio(multiple, factor):
    items = _items(d=384, heads=6)
    plain = plan_ranks(CompressionConfig(ratio=0.5, attention_factor=factor), items)
    plan = plan_ranks(CompressionConfig(ratio=0.5, attention_factor=factor, width_multiple=multiple), items)
    widths = {it.name: sum(plan[it.name]) for it in items}
    assert all(w % multiple == 0 for w in widths.values()), widths
    assert any(sum(plain[n]) % multiple for n in plain)  # the case is not aligned already
    before = sum(it.params_before for it in items)
    after = sum(it.params_at(*plan[it.name]) for it in items)
    # one FFN width step is `multiple` directions at every FFN site: 8 x 1920 x 8 / 7.09M = 1.7 % at 8
    assert abs((1 - after / before) - 0.5) < multiple * 8 * (384 + 1536) / before


def test_width_multiple_keeps_a_width_below_it():
    items = [PlanItem("tiny.fc", "encoder", "ffn", 6, 6 * 6 + 6, lambda r, lora: (r + lora) * 12 + 6)]
    assert sum(plan_ranks(CompressionConfig(ratio=0.5, width_multiple=8), items)["tiny.fc"]) < 8


def test_explicit_ranks_and_overrides():
    items = _items(n_layers=2)
    cfg = CompressionConfig(attention_rank=16, attention_lora_rank=4, ffn_rank=100,
                            overrides={"encoder.0.*": {"attention_rank": None, "ffn_rank": 50}})
    plan = plan_ranks(cfg, items)
    assert plan["encoder.0.attn"] is None
    assert plan["encoder.0.fc1"] == (50, 0) and plan["encoder.0.fc2"] == (50, 0)
    assert plan["encoder.1.attn"] == (16, 4) and plan["encoder.1.fc1"] == (100, 0)


def test_override_matching_nothing_is_an_error():
    cfg = CompressionConfig(ffn_rank=8, overrides={"decoder.*": {"ffn_rank": 4}})
    with pytest.raises(ValueError, match="matches no compressible module"):
        plan_ranks(cfg, _items(n_layers=1))


def test_unreachable_ratio_is_an_error():
    with pytest.raises(ValueError, match="not reachable"):
        plan_ranks(CompressionConfig(ratio=0.99, attention_factor=0.1), _items(n_layers=1))


def test_unknown_method_options_and_growing_ranks():
    """method_options naming no registered compressor is refused (a typo was silently ignored), and ranks that
    add parameters instead of removing them warn."""
    from transformers import BertConfig, BertModel

    import adaptwin

    model = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=16))
    with pytest.raises(ValueError, match="method_options names unknown compressors \\['residul'\\]; registered: "):
        adaptwin.plan(model, CompressionConfig(ratio=0.4, method_options={"residul": {}}))
    with pytest.warns(UserWarning, match="these ranks add parameters instead of removing them"):
        adaptwin.plan(model, CompressionConfig(attention_rank=8, attention_lora_rank=8, ffn_rank=32, ffn_lora_rank=8))
