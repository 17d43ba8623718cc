"""Speech in, text out: Gradio audio (or a file) -> 16 kHz mono waveform -> transcript.

`prepare_audio` turns what `gr.Audio(type="numpy")` hands over, `(sample_rate, data)`, or an audio
file path into a `PreparedAudio` (16 kHz mono float32 in [-1, 1], trimmed to `max_seconds`), and
refuses unusable input with an `AudioError` whose message can be shown to the user as is.
Files are decoded with `soundfile` (a speechbrain dependency): `torchaudio.load` 2.11 needs
`torchcodec`, which is not installed.

`Transcriber` loads a speechbrain `EncoderDecoderASR` lazily, or wraps an injected callable. The
default is `speechbrain/asr-conformersmall-transformerlm-librispeech`: the smallest acoustic model
among speechbrain's English LibriSpeech ASR repos (Conformer, d_model 144, asr.ckpt 54.9 MB, against
480 MB for the CRDNN and 442-654 MB for the large Conformer/Transformer; no wav2vec2), and its model
card declares the `EncoderDecoderASR` interface. Checked only from stored copies of its Hub pages:
its weights could not be downloaded here, so loading it under speechbrain 1.1.2, its CPU latency and
its accuracy are unverified; its beam search also uses a 381 MB Transformer LM, the bulk of the
download and of the CPU time. It outputs upper-case LibriSpeech-style text without punctuation.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile
import torch
import torchaudio

TARGET_SR = 16_000
MAX_SECONDS = 30.0
MIN_SECONDS = 0.1  # shorter clips hold no word and can break the models' convolutions
SILENCE_RMS = 1e-3  # about -60 dBFS: below any voice, above a muted or dead microphone's zeros
MIN_SR, MAX_SR = 4_000, 384_000
DEFAULT_MODEL_ID = "speechbrain/asr-conformersmall-transformerlm-librispeech"
RETRY_AFTER_S = 600.0  # a failed load costs up to ~25 s without network; don't pay it per request

# Integer PCM -> float: (offset, scale) so that (x - offset) / scale lies in [-1, 1). Gradio's
# pydub decoding gives int8/int16/int32 by sample width; 8-bit WAV read elsewhere is uint8.
_INT_PCM = {
    np.dtype(np.uint8): (128.0, 128.0),
    np.dtype(np.int8): (0.0, 128.0),
    np.dtype(np.int16): (0.0, 32768.0),
    np.dtype(np.int32): (0.0, 2147483648.0),
}
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


class AudioError(ValueError):
    """Audio we cannot or will not use; the message says what is wrong and what to do."""


class SpeechUnavailable(RuntimeError):
    """The ASR model cannot be loaded (offline, not cached, broken files); one-line message."""


@dataclass(frozen=True)
class PreparedAudio:
    """A clip ready for ASR. `trimmed` says the input was cut to `seconds` (from `original_seconds`)
    so the UI can tell the user; a bare tensor would hide that."""

    waveform: torch.Tensor  # [n] float32, 16 kHz mono, in [-1, 1]
    seconds: float
    original_seconds: float
    trimmed: bool
    sample_rate: int = TARGET_SR


def prepare_audio(
    audio: tuple[int, np.ndarray] | str | os.PathLike | None, *, max_seconds: float = MAX_SECONDS
) -> PreparedAudio:
    """Validate and convert Gradio numpy audio or an audio file to 16 kHz mono float32.

    Channels are averaged; floats beyond [-1, 1] are scaled down by their peak. Longer audio is cut
    to its first `max_seconds` (and `trimmed` set). Raises `AudioError` for no, empty, too short,
    silent or non-finite audio, bad shapes, dtypes or rates, and unreadable files.
    """
    if not max_seconds > 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")
    if audio is None:
        raise AudioError("No audio was received — record a clip or upload a file first.")
    if isinstance(audio, (str, os.PathLike)):
        # Files are read no further than needed, so their full length is known up front.
        sample_rate, data, total_frames = _read_file(Path(audio), max_seconds)
    elif isinstance(audio, tuple) and len(audio) == 2:
        sample_rate, data = audio
        total_frames = None
    else:
        raise AudioError(
            f"Unsupported audio input of type {type(audio).__name__} — expected "
            "(sample_rate, samples) as given by gr.Audio(type='numpy'), or a file path."
        )
    sample_rate = _check_rate(sample_rate)
    frames = _as_frames(np.asarray(data))  # [n, channels]
    if frames.shape[0] == 0:
        raise AudioError("The recording is empty — record a few seconds of speech and try again.")
    if total_frames is None:
        total_frames = frames.shape[0]
    samples = _to_float(frames[: int(max_seconds * sample_rate)])  # trim first: uploads can be long
    if not np.isfinite(samples).all():
        raise AudioError(
            "The audio contains invalid samples (NaN or infinity) — re-record or re-export the file."
        )
    mono = samples.mean(axis=1)  # [n]
    seconds = len(mono) / sample_rate
    if seconds < MIN_SECONDS:
        raise AudioError(
            f"The recording is too short ({seconds:.2f} s) — record at least one whole word."
        )
    rms = float(np.sqrt(np.mean(np.square(mono, dtype=np.float64))))
    if rms < SILENCE_RMS:
        raise AudioError(
            f"The recording is silent (RMS {rms:.1e}, threshold {SILENCE_RMS:.0e}) — check that the "
            "right microphone is selected and not muted, then speak closer to it."
        )
    waveform = _resample(torch.from_numpy(np.ascontiguousarray(mono, dtype=np.float32)), sample_rate)
    return PreparedAudio(
        waveform=waveform.clamp_(-1.0, 1.0),  # resampling can overshoot full scale slightly
        seconds=len(waveform) / TARGET_SR,
        original_seconds=total_frames / sample_rate,
        trimmed=total_frames > len(mono),
    )


def _read_file(path: Path, max_seconds: float) -> tuple[int, np.ndarray, int]:
    """(rate, first max_seconds of samples [n, channels], total frames) without decoding the rest."""
    if not path.is_file():
        raise AudioError(f"Audio file not found: {path} — upload the file again.")
    try:
        with soundfile.SoundFile(path) as f:
            rate = _check_rate(f.samplerate)  # before reading: an absurd rate would size the read
            frames = min(f.frames, math.ceil(max_seconds * rate))
            # Mixed down block by block: a compressed upload of a few kB can hold hundreds of channels,
            # and [frames, channels] float32 at once would be gigabytes.
            mono, n = np.empty(frames, np.float32), 0
            for block in f.blocks(blocksize=max(1, 2**20 // f.channels), frames=frames, dtype="float32",
                                  always_2d=True):
                mono[n : n + len(block)] = block.mean(axis=1)
                n += len(block)
            return rate, mono[:n, None], f.frames
    except AudioError:  # a ValueError, already saying what is wrong
        raise
    except (RuntimeError, OSError, TypeError, ValueError) as exc:  # LibsndfileError is a RuntimeError; a headerless
        # format (".raw": soundfile then wants the rate and layout given) is a TypeError
        raise AudioError(
            f"Could not read the audio file {path.name} ({exc}) — it may be corrupt or in an "
            "unsupported format; upload a WAV, FLAC, OGG or MP3 file."
        ) from exc


def _check_rate(sample_rate: object) -> int:
    if isinstance(sample_rate, (bool, np.bool_)) or not isinstance(
        sample_rate, (int, float, np.integer, np.floating)
    ):
        raise AudioError(f"Invalid sample rate {sample_rate!r} — expected a number of Hz.")
    if not (MIN_SR <= sample_rate <= MAX_SR) or sample_rate != int(sample_rate):
        raise AudioError(
            f"Unsupported sample rate {sample_rate} Hz — use a whole rate between {MIN_SR} and "
            f"{MAX_SR} Hz (16000, 44100 and 48000 are common)."
        )
    return int(sample_rate)


def _as_frames(data: np.ndarray) -> np.ndarray:
    """[n] or [n, channels] -> [n, channels]; anything else is refused."""
    if data.ndim == 1:
        data = data[:, None]
    if data.ndim != 2 or data.shape[1] == 0:
        raise AudioError(
            f"Unsupported audio shape {data.shape} — expected [samples] or [samples, channels]."
        )
    if data.shape[1] > 8 and data.shape[1] > data.shape[0]:
        raise AudioError(
            f"Audio shape {data.shape} looks like [channels, samples] — expected [samples, channels]."
        )
    return data


def _to_float(data: np.ndarray) -> np.ndarray:
    """PCM [n, channels] of any supported dtype -> float32 [n, channels] within [-1, 1]."""
    if data.dtype in _INT_PCM:
        offset, scale = _INT_PCM[data.dtype]
        return (data.astype(np.float32) - offset) / scale
    if data.dtype not in _FLOATS:
        names = ", ".join(str(d) for d in (*_INT_PCM, *_FLOATS))
        raise AudioError(f"Unsupported sample type {data.dtype} — expected one of: {names}.")
    samples = data.astype(np.float32)
    # Some decoders hand over unnormalised floats: rescaling keeps the signal, clipping would not.
    peak = float(np.abs(samples).max(initial=0.0))
    return samples / peak if np.isfinite(peak) and peak > 1.0 else samples


def _resample(waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """[n] at sample_rate -> [m] at 16 kHz with torchaudio's windowed sinc.

    Its kernel grows with the rates' reduced ratio: an odd rate such as 8001 Hz takes seconds and
    gigabytes. Such rates are treated as the nearest multiple of 100 Hz, a speed change of at most
    0.6 % above 8 kHz that ASR does not notice.
    """
    if sample_rate // math.gcd(sample_rate, TARGET_SR) > 1000:
        sample_rate = round(sample_rate / 100) * 100
    if sample_rate == TARGET_SR:
        return waveform
    return torchaudio.functional.resample(waveform, sample_rate, TARGET_SR)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


GO_ONLINE = ("start the app with HF_HUB_OFFLINE=0 (e.g. `HF_HUB_OFFLINE=0 python app.py`), or serve a Hub "
             "round with --repo / MMFT_REPO")


def offline_hint(model_id: str = DEFAULT_MODEL_ID) -> str:
    """What to do when speech needs a download but the Hub client is offline (app.py sets HF_HUB_OFFLINE=1
    for the bundled demo). Setting `local_files_only` changes nothing here: the environment decides."""
    return (f"it needs the speech model {model_id} from the Hub, and this app runs offline (HF_HUB_OFFLINE=1, "
            f"which app.py sets when it serves the bundled demo) with no copy of it cached. To let it download "
            f"once, {GO_ONLINE}; after that it loads from the cache, offline too.")


class Transcriber:
    """PreparedAudio -> text, with a speechbrain EncoderDecoderASR loaded on first use.

    `fn` (waveform [n] at 16 kHz -> str) replaces the model, for tests and demos. The environment
    is read at load time (huggingface_hub reads it once, when first used): `HF_HUB_OFFLINE`
    (unless `offline` is given) forbids network so a missing model fails in well under a second,
    and weights are linked under `$HF_HOME/mmft-speechbrain/` unless `savedir` is given. A failed
    load is remembered for `retry_after` seconds or until `reset()`, so requests fail fast.
    """

    def __init__(
        self,
        model_id: str = DEFAULT_MODEL_ID,
        *,
        fn: Callable[[torch.Tensor], str] | None = None,
        device: str | None = None,
        savedir: str | os.PathLike | None = None,
        offline: bool | None = None,
        retry_after: float = RETRY_AFTER_S,
    ):
        self.model_id = model_id
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._fn = fn
        self._savedir = savedir
        self._offline = offline
        self._retry_after = retry_after
        self._model = None
        self._failure: tuple[float, str] | None = None  # (monotonic time, message)
        # Gradio serves requests from threads: load once, and decode one clip at a time because
        # speechbrain's searchers keep per-call state (e.g. the attention's) on the module.
        self._lock = threading.Lock()

    def reset(self) -> None:
        """Forget the loaded model and any remembered failure; the next call loads again."""
        with self._lock:
            self._model, self._failure = None, None

    def transcribe(self, audio: PreparedAudio) -> str:
        """The transcript of a prepared clip, stripped (may be empty if nothing was recognised)."""
        if self._fn is not None:
            return str(self._fn(audio.waveform)).strip()
        batch = audio.waveform.unsqueeze(0)  # [1, n]
        with self._lock:
            words, _tokens = self._load().transcribe_batch(batch, torch.ones(1))
        return words[0].strip()

    def _load(self):
        """The model, loaded on first use; call with self._lock held."""
        if self._model is not None:
            return self._model
        if self._failure and time.monotonic() - self._failure[0] < self._retry_after:
            raise SpeechUnavailable(self._failure[1])
        offline = _env_flag("HF_HUB_OFFLINE") if self._offline is None else self._offline
        try:
            self._model = self._from_hparams(offline)
        except Exception as exc:  # import, network, cache or checkpoint: all mean "no speech"
            reason = (str(exc).strip().splitlines() or [""])[0][:200]
            if offline and not os.path.isdir(self.model_id):  # the library's own hint ("set
                # local_files_only to False") points the wrong way: the environment decides
                message = f"Speech recognition is unavailable: {offline_hint(self.model_id)}"
            else:
                message = (f"Speech recognition is unavailable: could not load {self.model_id} (no network, "
                           f"or the Hub unreachable?) — {type(exc).__name__}: {reason}")
            self._failure = (time.monotonic(), message)
            raise SpeechUnavailable(message) from exc
        return self._model

    def _from_hparams(self, offline: bool):
        from speechbrain.inference.ASR import EncoderDecoderASR  # slow import (~3 s): lazily
        from speechbrain.utils.fetching import FetchConfig

        hf_home = os.environ.get("HF_HOME") or os.path.expanduser("~/.cache/huggingface")
        cache_dir = os.environ.get("HF_HUB_CACHE") or os.path.join(hf_home, "hub")
        savedir = self._savedir or os.path.join(
            hf_home, "mmft-speechbrain", re.sub(r"[^\w.-]+", "--", self.model_id).strip("-")
        )
        return EncoderDecoderASR.from_hparams(
            source=self.model_id,
            savedir=savedir,
            run_opts={"device": self.device},
            fetch_config=FetchConfig(allow_network=not offline, huggingface_cache_dir=cache_dir),
        )
