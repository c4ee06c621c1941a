"""adaptwin: make transformers small and fast while keeping them accurate.

    small = adaptwin.compress(model, adaptwin.CompressionConfig(ratio=0.45))
    adaptwin.save(small, "out/"); same = adaptwin.load("out/")
"""

from adaptwin import architectures as _architectures  # noqa: F401  (registers the built-in adapters)
from adaptwin import compressors as _compressors  # noqa: F401  (registers the built-in compressors)
from adaptwin.architectures import ArchitectureAdapter, AttentionSite, LinearSite
from adaptwin.compress import CompressionRecord, Plan, compress, compression_record, plan
from adaptwin.compressors import Compressor
from adaptwin.compressors.pqm import AdaptReport, adapt
from adaptwin.config import CompressionConfig
from adaptwin.finetune import FinetuneConfig, FinetuneReport
from adaptwin.finetune import run_finetune as finetune
from adaptwin.finetune.select import select_layers
from adaptwin.fusion import (
    contiguous_layer_inputs,
    fuse_activations,
    gemv_linears,
    gemv_output_head,
    prepare_inference,
    unfuse_activations,
)
from adaptwin.io import load, read_meta, save
from adaptwin.registry import (
    get_architecture,
    get_compressor,
    list_architectures,
    list_compressors,
    register_architecture,
    register_compressor,
)

__version__ = "0.1.0"

__all__ = [
    "AdaptReport",
    "ArchitectureAdapter",
    "AttentionSite",
    "CompressionConfig",
    "CompressionRecord",
    "FinetuneConfig",
    "FinetuneReport",
    "Compressor",
    "LinearSite",
    "adapt",
    "compress",
    "compression_record",
    "contiguous_layer_inputs",
    "finetune",
    "fuse_activations",
    "gemv_linears",
    "gemv_output_head",
    "plan",
    "Plan",
    "prepare_inference",
    "get_architecture",
    "get_compressor",
    "list_architectures",
    "list_compressors",
    "load",
    "read_meta",
    "register_architecture",
    "register_compressor",
    "save",
    "select_layers",
    "unfuse_activations",
]
