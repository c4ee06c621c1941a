"""Speech evaluation: audio loading, datasets, word error rate and batched transcription.

This room uses adaptwin's public API only (never compression internals). Importing it stays light:
torch and transformers are imported by the functions that need them.
"""

from adaptwin.speech.audio import load_audio, resample, write_wav

__all__ = ["load_audio", "resample", "write_wav"]
