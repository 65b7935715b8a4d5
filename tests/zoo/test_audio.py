"""Audio for the speech models: log-mel, resampling, wav reading, the espeak-ng clips."""

from __future__ import annotations

import dataclasses
import shutil
import wave

import numpy as np
import pytest

from onnxcomp.errors import UserError
from onnxcomp.zoo import audio

needs_espeak = pytest.mark.skipif(shutil.which(audio.ESPEAK) is None, reason=audio.NO_ESPEAK)


def _peak_hz(signal: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(signal * np.hanning(len(signal))))
    return float(np.fft.rfftfreq(len(signal), 1.0 / rate)[spectrum.argmax()])


def test_log_mel_puts_a_tone_in_its_mel_bin():
    t = np.arange(audio.SAMPLE_RATE) / audio.SAMPLE_RATE
    spec = audio.log_mel(0.3 * np.sin(2 * np.pi * 1000.0 * t))
    assert spec.shape == (80, audio.SAMPLE_RATE // audio.HOP)
    filters = audio.mel_filters()
    freqs = np.linspace(0, audio.SAMPLE_RATE / 2, filters.shape[1])
    centers = filters @ freqs / filters.sum(axis=1)
    assert abs(centers[spec.mean(axis=1).argmax()] - 1000.0) < 40.0
    assert (filters.sum(axis=1) > 0).all()


@pytest.mark.parametrize("rate", [22050, 8000, 16000])
def test_resample_keeps_pitch_level_and_duration(rate):
    t = np.arange(rate) / rate  # one second
    tone = 0.5 * np.sin(2 * np.pi * 440.0 * t)
    out = audio.resample(tone, rate)
    assert out.dtype == np.float32 and len(out) == audio.SAMPLE_RATE
    assert abs(_peak_hz(out, audio.SAMPLE_RATE) - 440.0) <= 1.0
    assert abs(float(np.abs(out[1000:-1000]).max()) - 0.5) < 0.01


def test_resample_drops_what_the_new_rate_cannot_hold():
    rate = 22050
    t = np.arange(rate) / rate
    out = audio.resample(np.sin(2 * np.pi * 10000.0 * t), rate)  # above 8 kHz: no alias
    assert float(np.abs(out).max()) < 1e-3


def test_read_wav_averages_channels_and_scales(tmp_path):
    path = tmp_path / "stereo.wav"
    frames = np.array([[16384, 0], [-32768, -32768], [0, 32767]], "<i2")
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(2)
        handle.setsampwidth(2)
        handle.setframerate(22050)
        handle.writeframes(frames.tobytes())
    samples, rate = audio.read_wav(path)
    assert rate == 22050 and samples.dtype == np.float32
    np.testing.assert_allclose(samples, [0.25, -1.0, 32767 / 65536], atol=1e-7)
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(1)
        handle.setframerate(8000)
        handle.writeframes(b"\x80\x80")
    with pytest.raises(UserError, match="8-bit"):
        audio.read_wav(path)


def test_utterances_follow_their_split():
    calib = audio.utterances("speech-calib", 40)
    heldout = audio.utterances("speech", 40)
    assert audio.utterances("speech", 40) == heldout  # deterministic
    assert [u.text for u in calib[:30]] == list(audio.CALIB_SENTENCES)
    assert calib[30].text == audio.CALIB_SENTENCES[0]  # cycling, another voice or speed
    assert not {u.text for u in calib} & {u.text for u in heldout}
    assert {u.voice for u in calib} == set(audio.CALIB_VOICES)
    assert {u.voice for u in heldout} == set(audio.HELDOUT_VOICES)
    assert all(150 <= u.speed <= 170 and u.snr_db is None and u.gain == 0.5 for u in calib)
    assert all(130 <= u.speed <= 200 and 0.1 <= u.gain <= 0.8 for u in heldout)
    noisy = [u.snr_db for u in heldout if u.snr_db is not None]
    assert len(noisy) == 20 and all(10.0 <= snr <= 20.0 for snr in noisy)
    assert sum(len(u.text.split()) >= 15 for u in heldout[:16]) == 4  # one in four long
    other = audio.utterances("speech", 40, seed=1)
    assert [u.text for u in other] == [u.text for u in heldout]
    assert [u.voice for u in other] != [u.voice for u in heldout]
    assert [u.speed for u in other] != [u.speed for u in heldout]
    with pytest.raises(UserError, match="speech split"):
        audio.utterances("calib", 1)


def test_without_espeak_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(audio, "ESPEAK", "no-such-espeak-ng")
    audio.espeak_version.cache_clear()
    try:
        with pytest.raises(UserError, match="apt-get install espeak-ng"):
            audio.speak("hello", "en-us", 160)
    finally:
        audio.espeak_version.cache_clear()


@needs_espeak
def test_espeak_speaks_at_16_khz():
    clean = audio.speak("The baby finally fell asleep.", "en-us", 160)
    assert clean.dtype == np.float32 and 1.0 < len(clean) / audio.SAMPLE_RATE < 4.0
    assert float(np.abs(clean).max()) > 0.05
    faster = audio.speak("The baby finally fell asleep.", "en-us", 220)
    assert len(faster) < len(clean)



@needs_espeak
def test_every_voice_is_installed():
    """espeak-ng speaks an unknown voice with its default one and exits 0: check the names."""
    import subprocess

    def listed(option: str, column: int) -> set[str]:
        lines = subprocess.run([audio.ESPEAK, option], capture_output=True, text=True,
                               check=True).stdout.splitlines()[1:]
        return {line.split()[column] for line in lines if len(line.split()) > column}

    languages = listed("--voices=en", 1)
    variants = {name.rsplit("/", 1)[-1] for name in listed("--voices=variant", 4)}
    for voice in (*audio.CALIB_VOICES, *audio.HELDOUT_VOICES):
        language, _, variant = voice.partition("+")
        assert language in languages, voice
        assert not variant or variant in variants, voice


@needs_espeak
def test_utterance_audio_level_and_noise():
    clip = audio.Utterance("I cannot find my glasses anywhere.", "en-gb", 160, 0.3, None, 7)
    clean = audio.utterance_audio(clip)
    assert abs(float(np.abs(clean).max()) - 0.3) < 1e-6
    noisy = audio.utterance_audio(dataclasses.replace(clip, snr_db=12.0))
    np.testing.assert_array_equal(noisy, audio.utterance_audio(
        dataclasses.replace(clip, snr_db=12.0)))  # the noise is seeded
    assert abs(float(np.abs(noisy).max()) - 0.3) < 1e-6
    # the pauses are silent in the clean clip and hold noise in the noisy one
    quiet = np.abs(clean) < 1e-4
    assert quiet.sum() > 1000
    assert float(np.abs(noisy[quiet]).mean()) > 10 * float(np.abs(clean[quiet]).mean() + 1e-7)
