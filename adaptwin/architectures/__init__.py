"""Architecture adapters, one file per model family; the built-ins register themselves here."""

from adaptwin.architectures.base import (
    ArchitectureAdapter,
    AttentionConvention,
    AttentionSite,
    Linear,
    LinearSite,
    model_type_of,
)
from adaptwin.architectures.bert import BertAdapter
from adaptwin.architectures.gpt2 import GPT2Adapter
from adaptwin.architectures.llama import LlamaAdapter
from adaptwin.architectures.wav2vec2 import Wav2Vec2Adapter
from adaptwin.architectures.whisper import WhisperAdapter
from adaptwin.registry import register_architecture

for _adapter in (WhisperAdapter, Wav2Vec2Adapter, BertAdapter, GPT2Adapter, LlamaAdapter):
    register_architecture(_adapter)

__all__ = ["ArchitectureAdapter", "AttentionConvention", "AttentionSite", "Linear", "LinearSite", "model_type_of"]
