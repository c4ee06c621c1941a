"""What an architecture adapter tells the rest of the library.

An adapter knows where a model family keeps its attention heads and FFN matrices, how its attention
module is called, and how to rebuild an empty model from a saved config. It knows nothing about
compression methods: it hands out plain weights (``nn.Linear`` orientation, ``(out, in)``) in
`AttentionSite` / `LinearSite` records and an `AttentionConvention` describing the call signature.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass
class Linear:
    """A projection in ``nn.Linear`` orientation: ``y = x @ weight.T + bias``."""

    weight: torch.Tensor  # (out, in)
    bias: torch.Tensor | None = None  # (out,)

    @classmethod
    def of(cls, module: nn.Module) -> Linear:
        return cls(module.weight, getattr(module, "bias", None))


@dataclass
class AttentionConvention:
    """How a family's attention module is called and what it returns, for a drop-in replacement.

    Every family here returns ``(attn_output, attn_weights)``.
    """

    positional: tuple[str, ...] = ()  # names of positional arguments after hidden_states
    kv_keyword: str = "key_value_states"  # where cross-attention's encoder states arrive
    cross_mask_keyword: str | None = None  # mask used instead of attention_mask in cross-attention
    prescale_query: bool = False  # multiply q by the scale before attention (Whisper's order)
    apply_rotary: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None  # (q, k, cos, sin)


@dataclass
class AttentionSite:
    """One attention block: its weights per projection, head layout and calling convention."""

    path: str  # module replaced by the compressed attention
    component: str
    layer: int
    q: Linear  # (num_heads*head_dim, hidden_size)
    k: Linear  # (num_kv_heads*head_dim, kv_hidden_size)
    v: Linear  # (num_kv_heads*head_dim, kv_hidden_size)
    o: Linear  # (out_size, num_heads*head_dim)
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float  # the original 1/sqrt(d_h) (or the family's own), never 1/sqrt(compressed width)
    is_causal: bool = False
    cross: bool = False
    rotary: bool = False
    dropout: float = 0.0  # on the attention probabilities (training only)
    out_dropout: float = 0.0  # applied inside the module after the output projection (GPT-2's resid_dropout)
    out_path: str | None = None  # where o lives when it is not inside `path` (BERT's output.dense)
    layer_idx: int | None = None  # index into the KV cache

    @property
    def hidden_size(self) -> int:
        return self.q.weight.shape[1]

    @property
    def kv_hidden_size(self) -> int:
        return self.k.weight.shape[1]

    @property
    def out_size(self) -> int:
        return self.o.weight.shape[0]

    def params(self) -> int:
        return sum(t.numel() for p in (self.q, self.k, self.v, self.o) for t in (p.weight, p.bias) if t is not None)


@dataclass
class LinearSite:
    """One FFN matrix."""

    path: str
    component: str
    layer: int
    linear: Linear
    role: str = ""  # fc1 / fc2 / gate / up / down

    def params(self) -> int:
        return self.linear.weight.numel() + (self.linear.bias.numel() if self.linear.bias is not None else 0)


@dataclass
class ArchitectureAdapter:
    """Base class for adapters; subclasses set the class variables and implement the two site lists."""

    model_types: ClassVar[tuple[str, ...]] = ()
    components: ClassVar[tuple[str, ...]] = ()
    convention: AttentionConvention = field(default_factory=AttentionConvention)

    def attention_sites(self, model: nn.Module) -> list[AttentionSite]:
        raise NotImplementedError

    def ffn_sites(self, model: nn.Module) -> list[LinearSite]:
        raise NotImplementedError

    def activation_pairs(self, model: nn.Module) -> list[tuple[str, str]]:
        """``(linear path, activation path)`` for each FFN matrix whose output goes straight into an
        activation module, nothing in between: what `adaptwin.fuse_activations` may fuse. None by default."""
        return []

    def layer_paths(self, model: nn.Module) -> list[tuple[str, str]]:
        """``(path, component)`` of each transformer layer, the unit that layer-wise fine-tuning trains.

        By default a layer is the deepest module holding all sites that share a component and layer index
        (e.g. ``model.encoder.layers.3`` for its self_attn, fc1 and fc2); adapters may override.
        """
        groups: dict[tuple[str, int], list[str]] = {}
        for site in [*self.attention_sites(model), *self.ffn_sites(model)]:
            groups.setdefault((site.component, site.layer), []).append(site.path)
        out = []
        for (component, _), paths in groups.items():
            parts = [p.split(".") for p in paths]
            common = []
            for level in zip(*parts):
                if len(set(level)) > 1:
                    break
                common.append(level[0])
            if len(paths) > 1 and len(common) == min(len(p) for p in parts):
                common = common[:-1]  # one site path is a prefix of another: the layer is its parent
            out.append((".".join(common), component))
        return out

    def layer_stacks(self, model: nn.Module) -> dict[str, str]:
        """``{component: path}`` of the ``nn.ModuleList`` holding each component's layers, in the compressed
        model as in the original (`adaptwin.contiguous_layer_inputs` hooks the first layer of each).

        By default: an adapter with one component and a ``_stack(model)`` method (the built-in adapters'
        convention) has that stack; otherwise each layer path of `layer_paths` less its index, which needs
        the original modules. Adapters may override.
        """
        stack = getattr(self, "_stack", None)
        if callable(stack) and len(self.components) == 1:
            return {self.components[0]: stack(model)}
        stacks: dict[str, str] = {}
        for path, component in self.layer_paths(model):
            stacks.setdefault(component, path.rsplit(".", 1)[0])
        return stacks

    # Saving and rebuilding: Hugging Face models by default.
    def model_record(self, model: nn.Module) -> dict[str, Any]:
        """What `build_empty` needs to rebuild ``model``'s skeleton (JSON-able).

        Beside the config: the attention implementation (``config.to_dict`` drops it, and a model
        loaded for ``output_attentions`` must stay ``eager`` in its uncompressed modules) and the
        generation config (a checkpoint's own ``generation_config.json`` - Whisper's language and task
        tokens, forced ids, alignment heads - is not derivable from the model config).
        """
        record: dict[str, Any] = {"class": type(model).__name__, "config": model.config.to_dict()}
        attn = getattr(model.config, "_attn_implementation", None)
        if isinstance(attn, str):
            record["attn_implementation"] = attn
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            record["generation_config"] = generation.to_dict()
        return record

    def build_empty(self, record: dict[str, Any]) -> nn.Module:
        """The model's skeleton from `model_record`, parameters on the meta device (no memory)."""
        import transformers
        from transformers import CONFIG_MAPPING, PreTrainedModel

        cls = getattr(transformers, str(record.get("class")), None)
        if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
            raise ValueError(f"saved model class {record.get('class')!r} is not a transformers model class")
        cfg = dict(record["config"])
        model_type = cfg.get("model_type")
        if model_type not in CONFIG_MAPPING:
            raise ValueError(f"saved config has unknown model_type {model_type!r}")
        config = CONFIG_MAPPING[model_type].from_dict(cfg)
        if record.get("attn_implementation"):
            config._attn_implementation = record["attn_implementation"]
        with meta_parameters():
            model = cls(config)
        if record.get("generation_config") is not None and getattr(model, "generation_config", None) is not None:
            from transformers import GenerationConfig

            saved = record["generation_config"]
            generation = GenerationConfig.from_dict(saved)
            for key, value in saved.items():  # from_dict drops extra keys of a config made from the model's
                if not hasattr(generation, key):
                    setattr(generation, key, value)
            model.generation_config = generation
        return model.eval()


def model_type_of(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not model_type:
        raise ValueError(
            f"cannot tell the architecture of {type(model).__name__}: it has no config.model_type; "
            "pass a Hugging Face model or register an adapter for it"
        )
    return model_type


class meta_parameters:  # noqa: N801 - used as a context manager like torch.device
    """Create parameters on the meta device while buffers stay real (accelerate's init_empty_weights).

    Non-persistent buffers (rotary frequencies, position ids) are not saved by ``state_dict``; building
    them for real keeps them correct while the parameters take no memory until assigned.
    """

    def __enter__(self) -> meta_parameters:
        self._orig = nn.Module.register_parameter

        def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
            self._orig(module, name, param)
            if param is not None:
                p = module._parameters[name]
                module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

        nn.Module.register_parameter = register
        return self

    def __exit__(self, *exc: object) -> None:
        nn.Module.register_parameter = self._orig


def iter_layers(model: nn.Module, path: str) -> Iterator[tuple[int, str, nn.Module]]:
    """``(index, full path, layer)`` for each layer of the ``nn.ModuleList`` at ``path``."""
    layers = model.get_submodule(path)
    for i, layer in enumerate(layers):
        yield i, f"{path}.{i}", layer


def find_prefix(model: nn.Module, candidates: tuple[str, ...]) -> str:
    """The first of ``candidates`` that names a submodule (base model vs. task-head wrappers)."""
    for c in candidates:
        try:
            model.get_submodule(c)
            return c
        except AttributeError:
            continue
    raise ValueError(f"{type(model).__name__} has none of the expected submodules {candidates}")
