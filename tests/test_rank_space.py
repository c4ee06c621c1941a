"""Twin attention computes in rank space: its factors are the optimal rank-r products (checked against a dense
fp64 oracle), every twinned projection is thin, and grouped-query attention keeps its sharing. Part of the
architecture battery (tests/test_architectures.py; tolerances explained there).
"""

from __future__ import annotations

import math

import pytest
import tiny_models as tm
import torch

import adaptwin

rows = pytest.mark.parametrize("row", tm.ROWS, ids=lambda r: r.name)

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- 7. the dense truncated oracle

def truncate(m: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def dense_twin_attention(site, x: torch.Tensor, rank: int, scale: float) -> torch.Tensor:
    """Dense fp64 oracle of one compressed self-attention block: per head the rank-``rank`` SVD of
    M_h = [W_Qhᵀ; b_Qhᵀ]·W_Kh ((d+1)×d) and of N_h = W_Oh·W_Vh (d_out×d), scores [x, 1]·M_h·xᵀ·scale, and
    the output bias b_O + Σ_h W_Oh·b_Vh."""
    h, dh = site.num_heads, site.head_dim
    x = x.double()[0]  # (T, d)
    xh = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)  # (T, d+1)
    wq, wk, wv, wo = (p.weight.double() for p in (site.q, site.k, site.v, site.o))
    bq = site.q.bias.double() if site.q.bias is not None else torch.zeros(h * dh, dtype=x.dtype)
    out = site.o.bias.double() + wo @ site.v.bias.double()  # (d_out,)
    for i in range(h):
        rows = slice(i * dh, (i + 1) * dh)
        m = truncate(torch.cat([wq[rows].T, bq[rows][None]], 0) @ wk[rows], rank)  # (d+1, d)
        n = truncate(wo[:, rows] @ wv[rows], rank)  # (d_out, d)
        probs = torch.softmax(xh @ m @ x.T * scale, dim=-1)  # (T, T)
        out = out + probs @ x @ n.T  # (T, d_out)
    return out


@pytest.mark.parametrize("name", ["whisper", "wav2vec2"])  # query pre-scaled (Whisper) and scaled in SDPA
def test_rank_space_matches_dense_truncated_products(name: str) -> None:
    model = tm.original(name)
    site = tm.attention_sites(model)[0]  # encoder layer 0 self-attention
    rank = 3  # < head_dim 8, and 1/sqrt(3) is far from 1/sqrt(8)
    small = adaptwin.compress(model, adaptwin.CompressionConfig(attention_rank=rank))
    tw = small.get_submodule(site.path)
    assert math.isclose(site.scaling, site.head_dim**-0.5, rel_tol=1e-12)

    # The module's factors multiply back to the optimal rank-r products (Eckart–Young), per head.
    p = torch.cat([tw.q_proj.weight.T, tw.q_proj.bias[None]], 0).double()  # (d+1, H·r)
    q = tw.k_proj.weight.T.double()  # (d, H·r)
    wq, bq, wk = site.q.weight.double(), site.q.bias.double(), site.k.weight.double()
    for i in range(site.num_heads):
        cols, rows = slice(i * rank, (i + 1) * rank), slice(i * site.head_dim, (i + 1) * site.head_dim)
        m_ref = truncate(torch.cat([wq[rows].T, bq[rows][None]], 0) @ wk[rows], rank)
        assert tm.rel_err(p[:, cols] @ q[:, cols].T, m_ref) <= tm.EXACT_REL

    x = torch.randn(1, 11, site.hidden_size, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        out = tw(x)[0][0]  # (T, d_out)
    assert tm.rel_err(out, dense_twin_attention(site, x, rank, site.scaling)) <= tm.EXACT_REL
    # The oracle discriminates: the same products scaled by 1/sqrt(r) are far off.
    assert tm.rel_err(out, dense_twin_attention(site, x, rank, 1 / math.sqrt(rank))) > 1e-2


# ---------------------------------------------------------------------------------- 8. rank-space widths

@rows
def test_attention_computes_in_rank_space(row: tm.Row) -> None:
    model = tm.original(row.name)
    r, lora = row.head_dim // 2, 1
    small = adaptwin.compress(model, adaptwin.CompressionConfig(attention_rank=r, attention_lora_rank=lora,
                                                                twins=row.twins))
    w = r + lora
    sites = tm.attention_sites(model)
    assert set(tm.twin_modules(small)) == {s.path for s in sites}
    for site in sites:
        tw = small.get_submodule(site.path)
        out = tw.o_proj if site.out_path is None else small.get_submodule(site.out_path)
        twinned = []
        if "qk" in row.twins:
            assert tw.q_proj.out_features == site.num_heads * w
            assert tw.k_proj.out_features == site.num_kv_heads * w
            twinned += [tw.q_proj, tw.k_proj]
        if "vo" in row.twins:
            assert tw.v_proj.out_features == site.num_kv_heads * w
            assert out.in_features == site.num_heads * w
            twinned += [tw.v_proj, out]
        # Every twinned projection is thin: its narrow side is the rank space (H·(r+l) = 20 < H·d_h = 32).
        for lin in twinned:
            assert min(lin.weight.shape) < site.num_heads * site.head_dim
        if set(row.twins) == {"qk", "vo"}:  # no d×d matrix survives anywhere in the module
            d = site.hidden_size
            assert all(p.shape != (d, d) for p in [*tw.parameters(), out.weight])


# ------------------------------------------------------------------------------- 9. grouped-query attention

def test_grouped_query_attention_keeps_sharing() -> None:
    row = tm.ROW_BY_NAME["llama"]
    model = tm.original("llama")
    sites = tm.attention_sites(model)
    assert all(s.num_kv_heads < s.num_heads for s in sites)  # the row really is GQA
    for lora in (0, 2):
        small = adaptwin.compress(model, tm.full_rank(row, lora))
        for site in sites:
            tw = small.get_submodule(site.path)
            assert tw.v_proj.out_features == site.num_kv_heads * (row.head_dim + lora)  # one value head per group
            assert tw.o_proj.in_features == site.num_heads * (row.head_dim + lora)
            assert tw.num_key_value_groups == site.num_heads // site.num_kv_heads
        assert tm.rel_err(tm.run(row, small), tm.reference("llama")) <= tm.EXACT_REL
