"""Layer-wise fine-tuning (Eq. 9): capture each layer's calls, train each compressed layer alone."""

from adaptwin.finetune.capture import ActivationStore, capture
from adaptwin.finetune.config import FinetuneConfig
from adaptwin.finetune.layerwise import FinetuneReport
from adaptwin.finetune.layerwise import finetune as run_finetune
from adaptwin.finetune.stats import collect_stats
from adaptwin.finetune.trainer import LayerResult

__all__ = ["ActivationStore", "FinetuneConfig", "FinetuneReport", "LayerResult", "capture", "collect_stats",
           "run_finetune"]
