"""The registries are open: a new architecture and a new compressor, added here, get the whole pipeline
(compress, plan, save, load) without any edit to the package."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adaptwin
from adaptwin.architectures import ArchitectureAdapter, AttentionConvention, AttentionSite, Linear, LinearSite
from adaptwin.compressors import Compressor


class ToyConfig:
    model_type = "toy-test"

    def __init__(self, d=24, heads=3, ffn=40, layers=2):
        self.d, self.heads, self.ffn, self.layers = d, heads, ffn, layers

    def to_dict(self):
        return {"d": self.d, "heads": self.heads, "ffn": self.ffn, "layers": self.layers}


class ToyAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads, self.dh = heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x, attention_mask=None):
        b, t, _ = x.shape
        split = lambda y: y.view(b, t, self.heads, self.dh).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)),
                                             attn_mask=attention_mask, scale=1 / math.sqrt(self.dh))
        return self.o(out.transpose(1, 2).reshape(b, t, -1)), None


class ToyModel(nn.Module):
    """Not a Hugging Face model: only ``config.model_type`` ties it to its adapter."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"attn": ToyAttention(config.d, config.heads), "fc1": nn.Linear(config.d, config.ffn),
                           "fc2": nn.Linear(config.ffn, config.d)}) for _ in range(config.layers))

    def forward(self, x, mask=None):
        for blk in self.blocks:
            x = x + blk["attn"](x, mask)[0]  # positional mask: the convention maps it to attention_mask
            x = x + blk["fc2"](torch.relu(blk["fc1"](x)))
        return x


class ToyAdapter(ArchitectureAdapter):
    model_types = ("toy-test",)
    components = ("body",)

    def __init__(self):
        super().__init__(AttentionConvention(positional=("attention_mask",)))

    def attention_sites(self, model):
        return [AttentionSite(path=f"blocks.{i}.attn", component="body", layer=i, q=Linear.of(b["attn"].q),
                              k=Linear.of(b["attn"].k), v=Linear.of(b["attn"].v), o=Linear.of(b["attn"].o),
                              num_heads=b["attn"].heads, num_kv_heads=b["attn"].heads, head_dim=b["attn"].dh,
                              scaling=1 / math.sqrt(b["attn"].dh))
                for i, b in enumerate(model.blocks)]

    def ffn_sites(self, model):
        return [LinearSite(f"blocks.{i}.{n}", "body", i, Linear.of(b[n]), n)
                for i, b in enumerate(model.blocks) for n in ("fc1", "fc2")]

    def model_record(self, model):
        return {"config": model.config.to_dict()}

    def build_empty(self, record):
        with torch.device("meta"):
            return ToyModel(ToyConfig(**record["config"]))


class TruncatedDense(Compressor):
    """A deliberately different method: keep a dense nn.Linear holding the rank-r approximation."""

    name = "test-truncated-dense"
    site_kind = "ffn"

    def full_rank(self, site):
        return min(site.linear.weight.shape)

    def param_count(self, site, rank, lora_rank, config):
        return site.params()

    def compress(self, site, rank, lora_rank, config, adapter):
        u, s, vh = torch.linalg.svd(site.linear.weight.detach(), full_matrices=False)
        spec = {"in": site.linear.weight.shape[1], "out": site.linear.weight.shape[0]}
        module = nn.Linear(spec["in"], spec["out"])
        with torch.no_grad():
            module.weight.copy_((u[:, :rank] * s[:rank]) @ vh[:rank])
            module.bias.copy_(site.linear.bias)
        return {site.path: (module, spec)}

    def build(self, spec):
        with torch.device("meta"):
            return nn.Linear(spec["in"], spec["out"])


adaptwin.register_architecture(ToyAdapter)
adaptwin.register_compressor(TruncatedDense())


def _toy():
    torch.manual_seed(0)
    return ToyModel(ToyConfig()).eval()


def test_discovery_lists_outside_registrations():
    assert "toy-test" in adaptwin.list_architectures()
    assert "test-truncated-dense" in adaptwin.list_compressors()
    assert {"whisper", "bert", "gpt2", "llama", "wav2vec2", "hubert"} <= set(adaptwin.list_architectures())
    assert {"product_twin", "svd"} <= set(adaptwin.list_compressors())


def test_outside_architecture_gets_full_pipeline(tmp_path):
    model = _toy()
    x = torch.randn(2, 7, 24)
    mask = torch.ones(2, 1, 7, 7, dtype=torch.bool)
    mask[1, ..., 5:] = False
    with torch.no_grad():
        ref = model(x, mask)
    exact = adaptwin.compress(model, adaptwin.CompressionConfig(attention_rank=8, ffn_rank=24))
    with torch.no_grad():
        out = exact(x, mask)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5  # full rank: exact up to fp32 rounding
    small = adaptwin.compress(model, adaptwin.CompressionConfig(ratio=0.5))
    adaptwin.save(small, tmp_path / "toy")
    again = adaptwin.load(tmp_path / "toy")
    with torch.no_grad():
        assert torch.equal(again(x, mask), small(x, mask))


def test_outside_compressor_selected_by_name(tmp_path):
    model = _toy()
    small = adaptwin.compress(model, adaptwin.CompressionConfig(ffn_rank=3, ffn_method="test-truncated-dense"))
    assert isinstance(small.blocks[0]["fc1"], nn.Linear)
    assert torch.linalg.matrix_rank(small.blocks[0]["fc1"].weight).item() == 3
    assert isinstance(small.blocks[0]["attn"], ToyAttention)  # attention rank None: left alone
    adaptwin.save(small, tmp_path / "t")
    x = torch.randn(1, 5, 24)
    with torch.no_grad():
        assert torch.equal(adaptwin.load(tmp_path / "t")(x), small(x))


def test_registry_errors():
    adaptwin.register_compressor(TruncatedDense())  # the same class again (a re-run notebook cell): fine
    other = type("TruncatedDense", (TruncatedDense,), {})  # another class under the name: refused
    with pytest.raises(ValueError, match="already registered; pass overwrite=True"):
        adaptwin.register_compressor(other)
    adaptwin.register_compressor(TruncatedDense(), overwrite=True)
    stub = type("Stub", (TruncatedDense,), {"name": "stub-none", "param_count": lambda self, *a: None})
    adaptwin.register_compressor(stub)  # a stub that returns None (the README's `...`): named, not a TypeError
    with pytest.raises(ValueError, match=r"compressor 'stub-none': param_count\(\) returned None for .*fc1; it "
                                         r"must return a whole number >= 0"):
        adaptwin.compress(_toy(), adaptwin.CompressionConfig(ffn_rank=2, ffn_method="stub-none"))
    with pytest.raises(ValueError, match=r"has site_kind 'bogus'; allowed: \['attention', 'ffn', 'wrapper'\]"):
        adaptwin.register_compressor(type("Bogus", (TruncatedDense,), {"name": "bogus-kind", "site_kind": "bogus"}))
    with pytest.raises(ValueError, match="lacks 'param_count'"):
        adaptwin.register_compressor(type("Half", (), {"name": "half", "site_kind": "ffn"})())
    with pytest.raises(ValueError, match="model_types"):
        adaptwin.register_architecture(type("NoTypes", (), {})())
    with pytest.raises(ValueError, match=r"unknown compressor 'nope'; registered: \["):
        adaptwin.compress(_toy(), adaptwin.CompressionConfig(ffn_rank=2, ffn_method="nope"))
    with pytest.raises(ValueError, match="compresses ffn sites, not attention"):
        adaptwin.compress(_toy(), adaptwin.CompressionConfig(attention_rank=2, attention_method="svd"))


def test_unknown_model_type_lists_registered():
    model = _toy()
    model.config.model_type = "mystery"
    with pytest.raises(ValueError, match=r"unsupported model type 'mystery'; registered architectures: \[.*'bert'"):
        adaptwin.compress(model, adaptwin.CompressionConfig(ratio=0.3))
    with pytest.raises(ValueError, match="no config.model_type"):
        adaptwin.compress(nn.Linear(3, 3), adaptwin.CompressionConfig(ratio=0.3))


def test_bad_rank_and_component_refused_before_any_change():
    model = _toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"attention_rank 9 exceeds the head dimension 8.*allowed: 1..8"):
        adaptwin.compress(model, adaptwin.CompressionConfig(attention_rank=9), inplace=True)
    with pytest.raises(ValueError, match=r"ffn_rank 30 exceeds the matrix rank 24"):
        adaptwin.compress(model, adaptwin.CompressionConfig(ffn_rank=30), inplace=True)
    with pytest.raises(ValueError, match=r"unknown components \['encoder'\].*allowed: \['body'\]"):
        adaptwin.compress(model, adaptwin.CompressionConfig(ratio=0.3, components=("encoder",)), inplace=True)
    with pytest.raises(ValueError, match="matches no compressible module"):
        adaptwin.compress(model, adaptwin.CompressionConfig(ratio=0.3, overrides={"nowhere.*": {"ffn_rank": 2}}))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert isinstance(model.blocks[0]["attn"], ToyAttention)
