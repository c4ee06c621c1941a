"""Read and write audio: any common wav/flac in, mono float32 at the rate a feature extractor wants out.

    x = load_audio("0_george_0.wav")              # (T,) float32 in [-1, 1], 16 kHz
    write_wav("out/clip.wav", x, 16000)           # 16-bit PCM, written atomically

Reading uses soundfile (libsndfile: wav/flac at 8/16/24/32-bit int and float) when it is installed, else
scipy.io.wavfile (wav only). Resampling uses soxr (a band-limited resampler) when installed, else scipy's
polyphase ``resample_poly``; both keep a tone's frequency and reject aliases, which naive linear
interpolation does not.
"""

from __future__ import annotations

import os
import re
import tempfile
import wave
from math import gcd
from pathlib import Path

import numpy as np

from adaptwin._files import give_default_mode, remove_dead_temps, temp_prefix

__all__ = ["load_audio", "resample", "write_wav"]


def load_audio(path: str | os.PathLike, sampling_rate: int = 16000) -> np.ndarray:
    """The recording at ``path`` as mono float32 samples in [-1, 1] at ``sampling_rate`` Hz.

    Returns an array of shape ``(T,)``, float32. Channels are averaged; integer PCM of any width is scaled
    by its full range; float files are clipped to [-1, 1]. A missing file raises FileNotFoundError; an
    unreadable, corrupt or empty one raises ValueError naming the file.
    """
    path = Path(path)
    if not isinstance(sampling_rate, int | np.integer) or sampling_rate <= 0:
        raise ValueError(f"sampling_rate must be a positive whole number of Hz, got {sampling_rate!r}")
    if not path.is_file():
        raise FileNotFoundError(f"audio file {path} does not exist")
    data, rate = _read(path)  # (T, C) float, rate in Hz
    if data.size == 0 or data.shape[0] == 0:
        raise ValueError(f"audio file {path} holds no samples")
    if not np.all(np.isfinite(data)):
        raise ValueError(f"audio file {path} holds non-finite samples (NaN or infinity)")
    mono = data.mean(axis=1, dtype=np.float64) if data.shape[1] > 1 else data[:, 0].astype(np.float64)  # (T,)
    mono = resample(mono, rate, int(sampling_rate))
    return np.clip(mono, -1.0, 1.0).astype(np.float32)


def resample(x: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Band-limited resampling of a 1-D signal ``x`` (T,) from ``orig_rate`` to ``new_rate`` Hz (float64 out)."""
    if orig_rate <= 0 or new_rate <= 0:
        raise ValueError(f"sampling rates must be positive, got {orig_rate} -> {new_rate}")
    x = np.asarray(x, dtype=np.float64)
    if orig_rate == new_rate:
        return x
    try:
        import soxr
    except ImportError:
        soxr = None
    if soxr is not None:
        return np.asarray(soxr.resample(x, orig_rate, new_rate, quality="HQ"), dtype=np.float64)
    from scipy.signal import resample_poly

    g = gcd(int(orig_rate), int(new_rate))
    return resample_poly(x, new_rate // g, orig_rate // g)


def write_wav(path: str | os.PathLike, audio: np.ndarray, sampling_rate: int) -> Path:
    """Write ``audio`` as 16-bit PCM wav, atomically (temp file in the same folder, then ``os.replace``).

    ``audio``: (T,) mono or (T, C) with C channels; float in [-1, 1] (clipped) or int16 as is.
    """
    path = Path(path)
    if not isinstance(sampling_rate, int | np.integer) or sampling_rate <= 0:
        raise ValueError(f"sampling_rate must be a positive whole number of Hz, got {sampling_rate!r}")
    a = np.asarray(audio)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"audio for {path} must have shape (T,) or (T, channels) with T > 0, got {np.shape(audio)}")
    if a.dtype == np.int16:
        pcm = a
    elif np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"audio for {path} holds non-finite samples")
        # Scale by 32768, as readers divide by it, so a round trip errs by at most half a step (2^-16).
        pcm = np.clip(np.round(np.clip(a, -1.0, 1.0) * 32768.0), -32768, 32767).astype(np.int16)
    else:
        raise ValueError(f"audio for {path} must be float (in [-1, 1]) or int16, got {a.dtype}")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temps(path.parent, path.name)  # what a write killed mid-way left
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            with wave.open(f, "wb") as w:
                w.setnchannels(pcm.shape[1])
                w.setsampwidth(2)
                w.setframerate(int(sampling_rate))
                w.writeframes(np.ascontiguousarray(pcm).astype("<i2").tobytes())
            f.flush()
            os.fsync(f.fileno())
        give_default_mode(tmp)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ---------------------------------------------------------------------------------------------- readers


def _read(path: Path) -> tuple[np.ndarray, int]:
    """(samples (T, C) float64 in [-1, 1], rate) via soundfile, or scipy for wav when soundfile is absent."""
    try:
        import soundfile
    except (ImportError, OSError):  # OSError: the wheel is there but libsndfile is not
        soundfile = None
    if soundfile is not None:
        try:
            data, rate = soundfile.read(str(path), dtype="float64", always_2d=True)
        except (RuntimeError, ValueError, TypeError, EOFError) as e:  # LibsndfileError is a RuntimeError
            raise ValueError(f"cannot read audio file {path}: {_reason(e)}") from None
        return data, int(rate)
    if path.suffix.lower() != ".wav":
        raise ValueError(f"cannot read audio file {path}: only .wav can be read without the soundfile package "
                         "(pip install soundfile for flac)")
    return _read_wav_scipy(path)


def _reason(e: BaseException) -> str:
    """libsndfile's message without its own "Error opening '<path>': " prefix (the path is named already)."""
    return re.sub(r"^Error opening .*?: ", "", " ".join(str(e).split())) or type(e).__name__


def _read_wav_scipy(path: Path) -> tuple[np.ndarray, int]:
    import warnings

    from scipy.io import wavfile

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", wavfile.WavFileWarning)  # unknown chunks (LIST, ...) are harmless
            rate, data = wavfile.read(str(path))
    except (ValueError, EOFError, OSError, TypeError) as e:
        raise ValueError(f"cannot read audio file {path}: {_reason(e)}") from None
    data = data.reshape(data.shape[0], -1) if data.ndim else data.reshape(0, 1)
    if data.dtype == np.uint8:  # 8-bit wav is unsigned with 128 as silence
        out = (data.astype(np.float64) - 128.0) / 128.0
    elif np.issubdtype(data.dtype, np.signedinteger):
        # scipy returns 24-bit samples left-aligned in int32, so int32's full scale is right for both.
        out = data.astype(np.float64) / float(-np.iinfo(data.dtype).min)
    elif np.issubdtype(data.dtype, np.floating):
        out = data.astype(np.float64)
    else:
        raise ValueError(f"cannot read audio file {path}: unsupported sample type {data.dtype}")
    return out, int(rate)
