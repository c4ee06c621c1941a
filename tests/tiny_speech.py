"""A tiny word-level Whisper, its tokenizer and feature extractor, and a CLI runner, for the speech tests."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_cli import run_cli  # noqa: F401 - the speech tests import the runner from here

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
         "nine"]


def tokenizer():
    """Word-level: one id per word of `WORDS`, as the digit recogniser's."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def feature_extractor():
    """1 s windows of 16 mel bins."""
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=16, sampling_rate=16000, hop_length=160, chunk_length=1, n_fft=400)


def whisper(d_model: int = 64, std: float = 0.1, seed: int = 1):
    """A word-level Whisper over `WORDS`: 1 + 1 layers, 4 heads, 50 source positions, random weights of ``std``."""
    from tiny_models import reinit
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    cfg = WhisperConfig(vocab_size=len(WORDS), d_model=d_model, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=2 * d_model,
                        decoder_ffn_dim=2 * d_model, num_mel_bins=16, max_source_positions=50,
                        max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        decoder_start_token_id=1, begin_suppress_tokens=None, suppress_tokens=None)
    torch.manual_seed(0)
    return reinit(WhisperForConditionalGeneration(cfg), seed=seed, std=std)


def save_model_dir(d: Path, **kwargs) -> Path:
    """`whisper(**kwargs)` with its feature extractor and tokenizer, saved into ``d``."""
    whisper(**kwargs).save_pretrained(d)
    feature_extractor().save_pretrained(d)
    tokenizer().save_pretrained(d)
    return d


CHARACTERS = ["<pad>", "<unk>", "|", *"abcdefghijklmnopqrstuvwxyz"]


def save_ctc_dir(d: Path, std: float = 0.3, group_norm: bool = False) -> Path:
    """A character-level Wav2Vec2ForCTC (2 layers, 32 wide, the layer-norm feature encoder that takes an
    attention mask), its CTC tokenizer and raw-audio feature extractor, saved into ``d``. ``group_norm``: the
    wav2vec2-base kind instead, a GroupNorm feature encoder whose feature extractor gives no attention mask."""
    import json

    from tiny_models import reinit
    from transformers import Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.json").write_text(json.dumps({c: i for i, c in enumerate(CHARACTERS)}))
    Wav2Vec2CTCTokenizer(str(d / "vocab.json"), unk_token="<unk>", pad_token="<pad>",
                         word_delimiter_token="|").save_pretrained(d)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=not group_norm,
                             return_attention_mask=not group_norm).save_pretrained(d)
    cfg = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2), conv_bias=True,
                         num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4,
                         do_stable_layer_norm=not group_norm, feat_extract_norm="group" if group_norm else "layer",
                         mask_time_prob=0.0, vocab_size=len(CHARACTERS), pad_token_id=0)
    torch.manual_seed(0)
    reinit(Wav2Vec2ForCTC(cfg), seed=5, std=std).save_pretrained(d)
    return d
