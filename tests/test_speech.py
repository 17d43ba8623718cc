"""mmft.speech: Gradio/file audio -> 16 kHz mono, clear errors, and the ASR wrapper, all offline."""

from __future__ import annotations

import io
import re
import shutil
import time
import wave
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from hyperpyyaml import load_hyperpyyaml
from speechbrain.inference.ASR import EncoderDecoderASR

from mmft import speech
from mmft.speech import (
    AudioError,
    PreparedAudio,
    SpeechUnavailable,
    Transcriber,
    prepare_audio,
)

TINY_ASR = Path(__file__).parent / "assets" / "tiny_asr"
WORDS = "zebra quartz fjord glyph nymph vex jinx waltz".split()


def sine(sr: int, seconds: float, amplitude: float = 0.5, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return amplitude * np.sin(2 * np.pi * hz * t)  # [n] float64


def write_wav(path: Path, sr: int, pcm: np.ndarray) -> Path:
    """int16 PCM [n] or [n, channels] -> WAV via the stdlib."""
    pcm = pcm if pcm.ndim == 2 else pcm[:, None]
    with wave.open(str(path), "wb") as w:
        w.setnchannels(pcm.shape[1])
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(pcm.astype("<i2").tobytes())
    return path


@pytest.fixture
def offline_env(monkeypatch, tmp_path):
    """Offline, empty HF cache. Set here too (not only in conftest): Transcriber reads them at load."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


@pytest.fixture
def from_hparams_calls(monkeypatch) -> list[dict]:
    """The keyword arguments of every EncoderDecoderASR.from_hparams call (which still runs)."""
    calls = []
    real = EncoderDecoderASR.from_hparams
    monkeypatch.setattr(
        EncoderDecoderASR, "from_hparams", lambda *a, **k: calls.append(k) or real(*a, **k)
    )
    return calls


# --- prepare_audio: conversion ------------------------------------------------------------------


def test_int16_stereo_44k1_becomes_16k_mono_float():
    left = np.round(sine(44_100, 1.0) * 32767)
    stereo = np.stack([left, np.zeros_like(left)], axis=1).astype(np.int16)  # [44100, 2]
    out = prepare_audio((44_100, stereo))
    assert isinstance(out, PreparedAudio)
    assert out.waveform.dtype == torch.float32 and out.waveform.shape == (16_000,)
    assert out.sample_rate == 16_000 and out.seconds == 1.0 and not out.trimmed
    assert out.waveform.abs().max() <= 1.0
    # Channels are averaged (not one picked): a 0.5 sine beside silence gives a 0.25 sine.
    rms = out.waveform.square().mean().sqrt().item()
    assert rms == pytest.approx(0.25 / np.sqrt(2), rel=0.02)


@pytest.mark.parametrize(
    ("dtype", "encode", "atol"),
    [
        (np.uint8, lambda x: np.round(x * 127 + 128), 1e-2),
        (np.int8, lambda x: np.round(x * 127), 1e-2),
        (np.int16, lambda x: np.round(x * 32767), 1e-4),
        (np.int32, lambda x: np.round(x * (2**31 - 1)), 1e-6),
        (np.float32, lambda x: x, 1e-6),
        (np.float64, lambda x: x, 1e-6),
    ],
)
def test_pcm_dtypes_scale_to_unit_range(dtype, encode, atol):
    reference = sine(16_000, 0.5)  # at 16 kHz nothing is resampled, so values compare 1:1
    out = prepare_audio((16_000, encode(reference).astype(dtype)))
    assert out.waveform.dtype == torch.float32 and out.waveform.shape == (8_000,)
    np.testing.assert_allclose(out.waveform.numpy(), reference, atol=atol)


def test_full_scale_input_stays_within_unit_range():
    square = np.sign(sine(44_100, 1.0, hz=1000)).astype(np.float32)  # resampling overshoots it
    assert prepare_audio((44_100, square)).waveform.abs().max() <= 1.0


def test_unnormalised_float_is_rescaled_not_clipped():
    out = prepare_audio((16_000, sine(16_000, 0.5, amplitude=1000.0).astype(np.float32)))
    np.testing.assert_allclose(out.waveform.numpy(), sine(16_000, 0.5, amplitude=1.0), atol=1e-3)


def test_long_audio_is_trimmed_and_reported():
    out = prepare_audio((8_000, np.round(sine(8_000, 45.0) * 32767).astype(np.int16)))
    assert out.trimmed and out.seconds == 30.0 and out.original_seconds == 45.0
    assert out.waveform.shape == (30 * 16_000,)
    short = prepare_audio((48_000, sine(48_000, 3.0)), max_seconds=2.5)
    assert short.trimmed and short.waveform.shape == (40_000,)
    exact = prepare_audio((16_000, sine(16_000, 2.0)), max_seconds=2.0)
    assert not exact.trimmed and exact.seconds == 2.0


def test_odd_sample_rate_is_fast():
    # torchaudio's kernel for 8001 -> 16000 Hz takes ~8 s and ~2 GB; we round to 8000 Hz instead.
    start = time.perf_counter()
    out = prepare_audio((8_001, sine(8_001, 2.0)))
    assert time.perf_counter() - start < 2.0
    assert abs(out.waveform.shape[0] - 32_000) <= 8


def test_wav_file_matches_numpy_input_and_is_trimmed(tmp_path):
    pcm = np.round(np.stack([sine(22_050, 2.0), sine(22_050, 2.0, hz=220)], axis=1) * 32767)
    path = write_wav(tmp_path / "clip.wav", 22_050, pcm)
    from_file = prepare_audio(path)
    from_numpy = prepare_audio((22_050, pcm.astype(np.int16)))
    assert from_file.waveform.shape == (32_000,) and not from_file.trimmed
    torch.testing.assert_close(from_file.waveform, from_numpy.waveform, atol=1e-5, rtol=0)
    cut = prepare_audio(str(path), max_seconds=1.0)
    assert cut.trimmed and cut.seconds == 1.0 and cut.original_seconds == 2.0


def test_a_many_channel_file_is_mixed_down_block_by_block(tmp_path):
    """A compressed upload of a few kB can hold hundreds of channels: read whole as [frames, channels]
    float32 it cost gigabytes (255 channels of 48 kHz silence, 30 s: 4.2 GB from 53 kB). Mixed down
    block by block, the peak is the mono result plus a block or two of 2^20 samples; the waveform is the
    channels' mean, as before. 8 channels (FLAC's most), 20 s: 30.7 MB for the whole read alone."""
    import tracemalloc

    import soundfile

    rate, seconds, channels = 48_000, 20, 8
    t = np.arange(rate * seconds) / rate
    data = np.stack([0.1 * np.sin(2 * np.pi * (220 + 20 * c) * t) for c in range(channels)], axis=1)  # [n, 8]
    path = tmp_path / "eight.flac"
    soundfile.write(path, data.astype(np.float32), rate, subtype="PCM_16")
    expected = soundfile.read(path, dtype="float32")[0].mean(axis=1)  # [n]
    tracemalloc.start()  # numpy reports its buffers to tracemalloc
    try:
        got_rate, mono, frames = speech._read_file(path, max_seconds=30)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (got_rate, frames, mono.shape) == (rate, rate * seconds, (rate * seconds, 1))
    assert peak < rate * seconds * channels * 4, peak  # measured 16.4 MB; whole, the read alone is 30.7 MB
    np.testing.assert_allclose(mono[:, 0], expected, atol=1e-6)  # float32 means of the same samples
    cut = speech._read_file(path, max_seconds=1.5)[1]
    assert cut.shape == (72_000, 1) and np.array_equal(cut[:, 0], mono[:72_000, 0])


# --- prepare_audio: errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("audio", "message"),
    [
        (None, "No audio was received"),
        ((16_000, np.zeros(0, np.int16)), "The recording is empty"),
        ((16_000, np.zeros(16_000, np.int16)), "The recording is silent"),
        ((16_000, (sine(16_000, 1.0) * 1e-4).astype(np.float32)), "The recording is silent"),
        ((16_000, np.full(16_000, np.nan, np.float32)), r"invalid samples \(NaN or infinity\)"),
        ((16_000, np.r_[sine(16_000, 1.0), np.inf]), r"invalid samples \(NaN or infinity\)"),
        ((16_000, sine(16_000, 0.05)), "The recording is too short"),
        ((16_000, np.zeros((10, 2, 2), np.float32)), "Unsupported audio shape"),
        ((16_000, np.float32(0.5)), "Unsupported audio shape"),
        ((44_100, np.zeros((2, 44_100), np.int16)), r"looks like \[channels, samples\]"),
        ((16_000, np.ones(16_000, np.int64)), "Unsupported sample type int64"),
        ((16_000, np.ones(16_000, np.complex64)), "Unsupported sample type complex64"),
        ((0, sine(16_000, 1.0)), "Unsupported sample rate 0 Hz"),
        ((44_100.5, sine(16_000, 1.0)), "Unsupported sample rate 44100.5 Hz"),
        (("44100", sine(16_000, 1.0)), "Invalid sample rate '44100'"),
        ([16_000, sine(16_000, 1.0)], "Unsupported audio input of type list"),
    ],
)
def test_unusable_audio_raises_clear_audio_error(audio, message):
    with pytest.raises(AudioError, match=message):
        prepare_audio(audio)


def test_corrupt_or_missing_file_raises_audio_error(tmp_path):
    corrupt = tmp_path / "broken.wav"
    corrupt.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt this is not audio" + bytes(100))
    with pytest.raises(AudioError, match="Could not read the audio file broken.wav .* corrupt"):
        prepare_audio(corrupt)
    with pytest.raises(AudioError, match="Audio file not found"):
        prepare_audio(tmp_path / "missing.wav")
    with pytest.raises(AudioError, match="The recording is empty"):
        prepare_audio(write_wav(tmp_path / "empty.wav", 16_000, np.zeros(0)))
    with pytest.raises(AudioError) as fast:  # a readable file whose rate is refused: that message, not "corrupt"
        prepare_audio(write_wav(tmp_path / "fast.wav", 1_000_000, np.zeros(100)))
    assert str(fast.value).startswith("Unsupported sample rate 1000000 Hz")
    shutil.copyfile(write_wav(tmp_path / "ok.wav", 16_000, sine(16_000, 1.0)), tmp_path / "clip.raw")
    with pytest.raises(AudioError, match="Could not read the audio file clip.raw .* corrupt"):  # soundfile: TypeError
        prepare_audio(tmp_path / "clip.raw")


# --- Transcriber ---------------------------------------------------------------------------------


def test_injected_transcriber_gets_16k_waveform():
    seen = []
    transcriber = Transcriber(fn=lambda waveform: seen.append(waveform) or "  hello there \n")
    prepared = prepare_audio((44_100, np.round(sine(44_100, 1.5) * 32767).astype(np.int16)))
    assert transcriber.transcribe(prepared) == "hello there"
    assert seen[0] is prepared.waveform and seen[0].shape == (24_000,)


def test_failure_is_retried_after_retry_after(offline_env, from_hparams_calls):
    transcriber = Transcriber(retry_after=0.0)
    prepared = prepare_audio((16_000, sine(16_000, 1.0)))
    for _ in range(2):
        with pytest.raises(SpeechUnavailable, match="runs offline .* no copy of it cached"):
            transcriber.transcribe(prepared)
    assert len(from_hparams_calls) == 2


def test_default_model_offline_fails_fast_and_is_remembered(offline_env, from_hparams_calls):
    transcriber = Transcriber()
    assert transcriber.model_id == speech.DEFAULT_MODEL_ID
    prepared = prepare_audio((16_000, sine(16_000, 1.0)))
    start = time.perf_counter()
    with pytest.raises(SpeechUnavailable) as first:
        transcriber.transcribe(prepared)
    assert time.perf_counter() - start < 2.0
    message = str(first.value)
    assert message.startswith(
        f"Speech recognition is unavailable: it needs the speech model {speech.DEFAULT_MODEL_ID} from the Hub"
    )
    assert "start the app with HF_HUB_OFFLINE=0" in message and "--repo" in message
    assert "local_files_only" not in message  # the library's hint points the wrong way
    assert "\n" not in message
    assert len(from_hparams_calls) == 1
    assert from_hparams_calls[0]["fetch_config"].allow_network is False

    with pytest.raises(SpeechUnavailable, match="HF_HUB_OFFLINE=0"):
        transcriber.transcribe(prepared)
    assert len(from_hparams_calls) == 1  # the failure is remembered, not retried
    transcriber.reset()
    with pytest.raises(SpeechUnavailable):
        transcriber.transcribe(prepared)
    assert len(from_hparams_calls) == 2


@pytest.fixture
def tiny_asr_dir(tmp_path) -> Path:
    """The asset hyperparams plus a SentencePiece tokenizer and an asr.ckpt that always says "zebra"."""
    folder = tmp_path / "tiny_asr"
    shutil.copytree(TINY_ASR, folder)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([" ".join(WORDS)] * 4),
        model_writer=model,
        model_type="word",
        vocab_size=len(WORDS) + 3,
        normalization_rule_name="identity",
    )
    (folder / "tokenizer.ckpt").write_bytes(model.getvalue())
    tokenizer = spm.SentencePieceProcessor(model_proto=model.getvalue())

    with open(folder / "hyperparams.yaml", encoding="utf-8") as f:
        asr_model = load_hyperpyyaml(f)["asr_model"]
    output_layer = asr_model[3].w  # seq_lin: decoder state -> token logits
    with torch.no_grad():
        output_layer.weight.zero_()
        output_layer.bias.fill_(-10.0)
        output_layer.bias[tokenizer.piece_to_id("▁zebra")] = 10.0
    torch.save(asr_model.state_dict(), folder / "asr.ckpt")
    return folder


def test_local_speechbrain_model_transcribes(
    tiny_asr_dir, offline_env, from_hparams_calls, tmp_path
):
    transcriber = Transcriber(model_id=str(tiny_asr_dir), savedir=tmp_path / "save", device="cpu")
    assert from_hparams_calls == []  # nothing is loaded before the first transcription
    prepared = prepare_audio((16_000, sine(16_000, 1.0)))
    text = transcriber.transcribe(prepared)
    # Only the loaded asr.ckpt makes the greedy decoder say "zebra"; words come from the tokenizer.
    assert isinstance(text, str) and text.split() == ["zebra"] * 5
    assert transcriber.transcribe(prepared) == text
    assert len(from_hparams_calls) == 1  # loaded once, lazily
    assert from_hparams_calls[0]["run_opts"] == {"device": "cpu"}
    assert (tmp_path / "save" / "asr.ckpt").exists()


def test_broken_local_model_is_speech_unavailable(tiny_asr_dir, offline_env, tmp_path):
    (tiny_asr_dir / "tokenizer.ckpt").unlink()
    transcriber = Transcriber(model_id=str(tiny_asr_dir), savedir=tmp_path / "save", device="cpu")
    with pytest.raises(SpeechUnavailable, match=f"could not load {re.escape(str(tiny_asr_dir))}"):
        transcriber.transcribe(prepare_audio((16_000, sine(16_000, 1.0))))
