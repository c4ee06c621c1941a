"""`torch.compile` of compressed models runs the ``adaptwin`` ops as single graph nodes, no graph breaks.

Whichever backend the dispatcher picks (C++ kernel or reference) sits behind the op; the graph must
contain the op itself (not its decomposition) and the compiled model must match the eager one.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

import adaptwin

sys.path.insert(0, os.path.dirname(__file__))
import tiny_models  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _encoder(quantization: str | None, fuse: bool = False) -> torch.nn.Module:
    torch._dynamo.reset()
    config = adaptwin.CompressionConfig(ratio=0.5, components=("encoder",), quantization=quantization)
    model = adaptwin.compress(tiny_models.whisper(), config)
    if fuse:
        assert adaptwin.fuse_activations(model)  # fc1 runs GELU (traced as F.gelu(F.linear(...)))
    encoder = model.model.encoder
    for m in encoder.modules():
        if quantization and hasattr(m, "pack"):
            m.pack()  # the packed state, as adaptwin.load builds it: codes go to rank_linear
    return encoder


@pytest.mark.parametrize("quantization,fuse", [(None, False), ("nf4", False), (None, True)])
def test_whisper_encoder_traces_without_graph_breaks(quantization, fuse):
    encoder = _encoder(quantization, fuse)
    x = tiny_models.whisper_inputs()["input_features"]
    with torch.no_grad():
        explained = torch._dynamo.explain(encoder)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    code = explained.graphs[0].code
    assert "adaptwin.attention" in code  # the op itself, not its decomposition
    if quantization:
        assert "adaptwin.rank_linear" in code


@pytest.mark.slow
@pytest.mark.parametrize("quantization,fuse", [(None, False), ("nf4", False), (None, True)])
def test_compiled_whisper_encoder_matches_eager(quantization, fuse):
    encoder = _encoder(quantization, fuse)
    x = tiny_models.whisper_inputs()["input_features"]
    with torch.no_grad():
        eager = encoder(x).last_hidden_state
        compiled = torch.compile(encoder, fullgraph=True)(x).last_hidden_state  # fullgraph: a break raises
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("quantization", [None, "nf4"])
def test_exported_whisper_encoder_keeps_the_ops(quantization):
    """`torch.export` (the front end of AOTInductor and ExecuTorch) keeps both ops as single nodes; the exported
    program computes what the eager encoder does: exactly for fp32 factors, to float32 rounding for packed
    ones (eager, their batched calls multiply whole decoded factors with ATen GEMMs; the program calls the
    op, which sums in another order)."""
    encoder = _encoder(quantization)
    x = tiny_models.whisper_inputs()["input_features"]
    with torch.no_grad():
        eager = encoder(x).last_hidden_state
        program = torch.export.export(encoder, (x,))
        code = program.graph_module.code
        assert "adaptwin.attention" in code
        if quantization:
            assert "adaptwin.rank_linear" in code
        tol = 1e-5 if quantization else 0.0
        torch.testing.assert_close(program.module()(x).last_hidden_state, eager, rtol=tol, atol=tol)


def test_aot_inductor_package_runs_the_ops(tmp_path):
    """An AOTInductor package of an NF4 encoder (what a libtorch deployment loads) runs, calling the ops through
    its proxy executor, and matches eager. Absent factors are passed as [0, 0], not []: the executor hands an
    empty SymInt[] to the op as None (torch 2.13)."""
    import shutil

    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("AOTInductor needs a C++ compiler")
    encoder = _encoder("nf4")
    x = tiny_models.whisper_inputs()["input_features"]
    with torch.no_grad():
        eager = encoder(x).last_hidden_state
        program = torch.export.export(encoder, (x,))
        path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "encoder.pt2"))
        out = torch._inductor.aoti_load_package(path)(x)
    torch.testing.assert_close(out.last_hidden_state, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("double_quant", [False, True])
def test_packed_embedding_lookup_traces_without_graph_breaks(double_quant):
    """A packed token table's lookup (whole-row NF4 rows: gathered codes and scales, one decode) is one graph,
    and so is the double-quantised scales' decoding (bitsandbytes' dynamic map, built at import)."""
    from torch import nn

    from adaptwin.compressors.quantized import QuantEmbedding
    from adaptwin.quant import QuantFormat

    torch._dynamo.reset()
    emb = QuantEmbedding.from_embedding(nn.Embedding(300, 128), QuantFormat("nf4", 64, double_quant))
    ids = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        explained = torch._dynamo.explain(emb)(ids)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert torch.equal(torch.compile(emb, fullgraph=True)(ids), emb(ids))


def test_a_kept_call_traces_as_the_op():
    """A packed module whose batch-1 call is kept (`KeptCall`, run from C++ in eager mode) traces as the op in
    one graph, no break, and the compiled call matches the eager one."""
    from adaptwin.compressors.quantized import QuantLowRankLinear
    from adaptwin.quant import QuantFormat

    torch._dynamo.reset()
    m = QuantLowRankLinear(64, 96, 16, 4, True, fmt=QuantFormat("nf4", 64, True), quantize_lora=False, packed=False)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
        m.pack()
        x = torch.randn(1, 1, 64)
        eager = m(x)
        assert m._call.kept is not None
        explained = torch._dynamo.explain(m)(x)
        assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
        assert "adaptwin.rank_linear" in explained.graphs[0].code
        assert torch.equal(torch.compile(m, fullgraph=True)(x), eager)


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_gemv_linears_trace_as_the_op_for_few_rows(rows):
    """Under torch.compile a `GemvLinear` call and a `LowRankLinear` (fp factors) call of few rows trace as the
    op (the GEMV that eager calls run, so the compiled results are the eager ones bit for bit); many rows
    trace as ATen GEMMs, as in eager mode."""
    from adaptwin.compressors.ffn_svd.layer import LowRankLinear
    from adaptwin.fusion import GemvLinear

    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(rows)
    head = torch.nn.Linear(48, 200)
    head.__class__ = GemvLinear
    low = LowRankLinear(48, 96, 12, 4, True)
    with torch.no_grad():
        for p in [*head.parameters(), *low.parameters()]:
            p.copy_(torch.randn(p.shape, generator=gen))
        x = torch.randn(1, rows, 48, generator=gen)
        for m in (head, low):
            explained = torch._dynamo.explain(m)(x)
            assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
            assert ("adaptwin.rank_linear" in explained.graphs[0].code) == (rows <= 4), explained.graphs[0].code
            torch._dynamo.reset()
            assert torch.equal(torch.compile(m, fullgraph=True)(x), m(x))


@pytest.mark.parametrize("quantization", [None, "nf4"])
def test_a_decoding_step_with_a_static_cache_is_one_graph(quantization):
    """A compressed Whisper decoding step (prepare_inference, a static self-attention cache in rank space, as
    compiled decoding runs it): one graph, no break, the attention and rank-r ops in it; two compiled steps
    match the eager ones."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache, StaticCache

    torch._dynamo.reset()
    small = adaptwin.compress(tiny_models.whisper(), adaptwin.CompressionConfig(ratio=0.5, quantization=quantization))
    adaptwin.prepare_inference(small)
    dec, proj = small.model.decoder, small.proj_out
    enc = torch.randn(1, 25, small.config.d_model, generator=torch.Generator().manual_seed(5))

    def step(ids, cache, pos):
        h = dec(input_ids=ids, encoder_hidden_states=enc, past_key_values=cache, use_cache=True,
                cache_position=pos).last_hidden_state
        return proj(h[:, -1])

    def steps(fn):
        cache = EncoderDecoderCache(StaticCache(config=small.config, max_cache_len=16), DynamicCache())
        return [fn(torch.tensor([[t + 3]]), cache, torch.tensor([t])) for t in range(2)]

    with torch.inference_mode():
        eager = steps(step)
        cache = EncoderDecoderCache(StaticCache(config=small.config, max_cache_len=16), DynamicCache())
        explained = torch._dynamo.explain(step)(torch.tensor([[3]]), cache, torch.tensor([0]))
        assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
        code = explained.graphs[0].code
        assert "adaptwin.attention" in code and "adaptwin.rank_linear" in code
        torch._dynamo.reset()
        compiled = steps(torch.compile(step, fullgraph=True, backend="eager"))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
