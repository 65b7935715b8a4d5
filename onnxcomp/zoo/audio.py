"""Audio for the speech models: Whisper's log-mel spectrogram, synthetic sounds, and speech
spoken by espeak-ng.

:func:`log_mel`: 16 kHz audio -> float32 [n_mels, samples / 160], Whisper's frontend (25 ms
periodic Hann window, 10 ms hop, Slaney mel filters, log10 clamped 8 decades under the peak,
``(x + 4) / 4``).

:func:`synth_audio` (splits ``calib``, ``eval``, ``heldout``): sounds without words, for models
with random weights. ``calib`` and ``eval``: harmonic tones (1/k harmonic roll-off, vibrato)
and chirps over light white noise (SNR 20-40 dB), from different seed streams. ``heldout``:
what calibration never saw: vowel-like sounds (harmonics shaped by three formant peaks, a new
vowel per syllable), band-passed noise bursts (fricative-like), silence gaps, over pink noise
at SNR 0-15 dB.

:func:`utterances` + :func:`utterance_audio` (splits ``speech-calib``, ``speech``): English
sentences written here, spoken by espeak-ng (a subprocess; ``apt-get install espeak-ng``), read
with :mod:`wave` and resampled to 16 kHz (FFT, band-limited). The two splits share no sentence.
``speech-calib``: American voices (en-us, en-us+f2) at 150-170 words per minute, clean.
``speech``: other accents and voice variants (British, Scottish, Caribbean, New York,
Lancaster, West Midlands; female and male variants), 130-200 words per minute, a random level,
every second clip under white or pink noise at 10-20 dB SNR, every fourth of the first 24
sentences long (17-22 words). Different espeak-ng builds speak differently:
:func:`espeak_version` belongs in any cache key.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
import wave
from dataclasses import dataclass

import numpy as np

from onnxcomp.errors import UserError

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
SYNTH_SPLITS = {"calib": 0, "eval": 1, "heldout": 2}
ESPEAK = "espeak-ng"
NO_ESPEAK = "the speech split needs espeak-ng (apt-get install espeak-ng)"

CALIB_SENTENCES = (
    "The kettle is boiling in the kitchen.",
    "Please close the window before you leave.",
    "My brother plays the guitar every evening.",
    "We walked along the beach at sunset.",
    "The train to the city was late this morning.",
    "She planted tomatoes in the back garden.",
    "Can you pass me the salt, please?",
    "The children are reading books in the library.",
    "It started to rain just after lunch.",
    "He fixed the broken chair with some glue.",
    "The museum is closed on Mondays.",
    "The old man fed the ducks by the pond.",
    "I left my keys on the kitchen table.",
    "The coffee tastes better with a little milk.",
    "They painted the fence a bright shade of blue.",
    "The bus stops right outside the school.",
    "Turn off the lights when you go to bed.",
    "A cold wind blew across the empty field.",
    "She wrote a letter to her grandmother.",
    "The bakery sells fresh bread every morning.",
    "We need to buy eggs and butter.",
    "The cat slept on the warm windowsill.",
    "He forgot to water the plants again.",
    "The meeting was moved to next week.",
    "Snow covered the mountains in the distance.",
    "Please speak a little more slowly.",
    "The doctor told him to get more rest.",
    "I would like a cup of tea.",
    "The river flows quietly through the valley.",
    "Everyone laughed at the funny story.",
)
HELDOUT_SENTENCES = (  # every fourth of the first 24 long
    "The library will be closed for repairs next month.",
    "A small bird was singing outside my window.",
    "He carried the heavy boxes up the stairs.",
    ("When the storm finally passed, the whole town came outside to look at the damage and "
     "help clean up the streets."),
    "Please remember to lock the front door.",
    "The soup needs a little more salt.",
    "Our flight was delayed because of the fog.",
    ("She has been learning to play the piano since she was a child, and now she teaches music "
     "at the local school."),
    "The farmer drove his tractor across the muddy field.",
    "I cannot find my glasses anywhere.",
    "The shop on the corner sells fresh flowers.",
    "After dinner we sat by the fire and told stories until it was very late at night.",
    "The baby finally fell asleep.",
    "They built a sandcastle near the water.",
    "The teacher asked the students to open their books.",
    ("If you follow this road for a while, you will see a large white house on the left side of "
     "the hill."),
    "My phone battery is almost empty.",
    "The apples in the basket are ripe.",
    "He whistled a happy tune on his way home.",
    ("The garden looks beautiful in the spring when all the flowers are in bloom and the trees "
     "are green again."),
    "We watched the stars from the roof of the house.",
    "Could you help me carry these bags?",
    "The dog chased the ball into the bushes.",
    ("The wind was so strong that it knocked over the chairs on the porch and blew the leaves "
     "all over the yard."),
    "She smiled and waved from across the street.",
    "The old bridge was painted green last summer.",
    "I like to go for a walk in the morning.",
    "The lake was frozen solid all winter.",
    "The cake is cooling on the kitchen counter.",
    "Nobody knew where the little boat had gone.",
)
CALIB_VOICES = ("en-us", "en-us+f2")
HELDOUT_VOICES = ("en-gb", "en-us+f3", "en-gb-scotland", "en-029+m3", "en-gb-x-rp+f4",
                  "en-us-nyc", "en-gb-x-gbclan+m7", "en-gb-x-gbcwmd+f1")
# split -> (sentences, voices, words per minute range, noisy every second clip, stream)
SPEECH_SPLITS = {"speech-calib": (CALIB_SENTENCES, CALIB_VOICES, (150, 170), False, 3),
                 "speech": (HELDOUT_SENTENCES, HELDOUT_VOICES, (130, 200), True, 4)}


# ---------------------------------------------------------------------------------------------
# Whisper's log-mel spectrogram


def _hz_to_mel(f):
    """Slaney's mel scale (librosa's default, as Whisper's filters): linear under 1 kHz."""
    f = np.asarray(f, dtype=np.float64)
    linear = f / (200.0 / 3)
    log = 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27.0)
    return np.where(f >= 1000.0, log, linear)


def _mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0)),
                    m * (200.0 / 3))


@functools.cache
def mel_filters(n_mels: int = 80, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE
                ) -> np.ndarray:
    """float32 [n_mels, n_fft / 2 + 1]: triangular Slaney-normalized filters, 0 to Nyquist."""
    freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2), n_mels + 2))
    widths = np.diff(edges)
    ramps = edges[:, None] - freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return weights.astype(np.float32)


def log_mel(audio: np.ndarray, n_mels: int = 80) -> np.ndarray:
    """Whisper's log-mel spectrogram: float32 [n_mels, len(audio) / HOP]."""
    audio = np.asarray(audio, dtype=np.float32)
    padded = np.pad(audio, N_FFT // 2, mode="reflect")  # torch.stft(center=True)
    count = 1 + (len(padded) - N_FFT) // HOP
    index = np.arange(count)[:, None] * HOP + np.arange(N_FFT)[None, :]
    window = np.hanning(N_FFT + 1)[:-1].astype(np.float32)  # periodic Hann
    power = np.abs(np.fft.rfft(padded[index] * window, axis=1)) ** 2
    mel = mel_filters(n_mels) @ power[:-1].T.astype(np.float32)  # Whisper drops the last frame
    spec = np.log10(np.maximum(mel, 1e-10))
    spec = np.maximum(spec, spec.max() - 8.0)
    return ((spec + 4.0) / 4.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# synthetic sounds (no words)


def _envelope(rng: np.random.Generator, length: int) -> np.ndarray:
    attack = max(1, int(length * rng.uniform(0.02, 0.2)))
    release = max(1, int(length * rng.uniform(0.05, 0.3)))
    env = np.ones(length)
    env[:attack] = np.linspace(0.0, 1.0, attack)
    env[length - release:] = np.minimum(env[length - release:], np.linspace(1.0, 0.0, release))
    return env


def _tone(rng: np.random.Generator, length: int) -> np.ndarray:
    """A harmonic tone: f0 80-400 Hz with vibrato, harmonics rolling off as 1/k."""
    t = np.arange(length) / SAMPLE_RATE
    f0 = rng.uniform(80.0, 400.0)
    vibrato = 1.0 + rng.uniform(0.0, 0.03) * np.sin(2 * np.pi * rng.uniform(3.0, 7.0) * t)
    phase = 2 * np.pi * np.cumsum(f0 * vibrato) / SAMPLE_RATE
    count = int(min(rng.integers(3, 11), (SAMPLE_RATE / 2 - 200) // f0))
    wave = sum(np.sin(k * phase + rng.uniform(0, 2 * np.pi)) / k for k in range(1, count + 1))
    return wave * _envelope(rng, length)


def _chirp(rng: np.random.Generator, length: int) -> np.ndarray:
    """A linear or exponential sweep between 100 Hz and 6 kHz."""
    t = np.arange(length) / SAMPLE_RATE
    f_start, f_end = rng.uniform(100.0, 6000.0, size=2)
    if rng.random() < 0.5:
        freq = f_start + (f_end - f_start) * t / max(t[-1], 1e-9)
    else:
        freq = f_start * (f_end / f_start) ** (t / max(t[-1], 1e-9))
    return np.sin(2 * np.pi * np.cumsum(freq) / SAMPLE_RATE) * _envelope(rng, length)


def _vowel(rng: np.random.Generator, length: int) -> np.ndarray:
    """Vowel-like syllables: jittered harmonics of f0 shaped by three formant peaks, a new
    vowel (formant set) per 0.1-0.4 s syllable, with short pauses between syllables."""
    out = np.zeros(length)
    start = 0
    f0 = rng.uniform(90.0, 250.0)
    while start < length:
        size = min(length - start, int(SAMPLE_RATE * rng.uniform(0.1, 0.4)))
        t = np.arange(size) / SAMPLE_RATE
        formants = (rng.uniform(300, 900), rng.uniform(900, 2500), rng.uniform(2400, 3500))
        widths = (rng.uniform(60, 120), rng.uniform(80, 160), rng.uniform(120, 250))
        pitch = f0 * (1.0 + 0.01 * rng.standard_normal()) * (1.0 - 0.1 * t / max(t[-1], 1e-3))
        phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
        harmonics = np.arange(1, int(4000 // f0) + 1)
        gains = sum(1.0 / (1.0 + ((harmonics * f0 - f) / w) ** 2)
                    for f, w in zip(formants, widths))
        wave = np.sin(np.outer(phase, harmonics)) @ gains
        out[start:start + size] = wave / max(np.abs(wave).max(), 1e-9) * _envelope(rng, size)
        start += size + int(SAMPLE_RATE * rng.uniform(0.02, 0.15))
    return out


def _burst(rng: np.random.Generator, length: int) -> np.ndarray:
    """Band-passed noise bursts of 50-200 ms (fricative-like, 2-8 kHz) with gaps."""
    out = np.zeros(length)
    start = int(rng.integers(0, max(1, length // 8)))
    while start < length:
        size = min(length - start, int(SAMPLE_RATE * rng.uniform(0.05, 0.2)))
        spectrum = np.fft.rfft(rng.standard_normal(size))
        freqs = np.fft.rfftfreq(size, 1.0 / SAMPLE_RATE)
        low = rng.uniform(2000.0, 5000.0)
        spectrum[(freqs < low) | (freqs > low + rng.uniform(1000.0, 3000.0))] = 0
        burst = np.fft.irfft(spectrum, size)
        out[start:start + size] = burst / max(np.abs(burst).max(), 1e-9) * _envelope(rng, size)
        start += size + int(SAMPLE_RATE * rng.uniform(0.1, 0.6))
    return out


def _pink(rng: np.random.Generator, length: int) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(length))
    spectrum /= np.sqrt(np.maximum(np.fft.rfftfreq(length), 1.0 / length))
    noise = np.fft.irfft(spectrum, length)
    return noise / max(noise.std(), 1e-12)


def synth_audio(split: str, index: int, seconds: float, seed: int = 0) -> np.ndarray:
    """float32 audio at 16 kHz: a sound for 30-100 % of ``seconds``, then zeros (padding)."""
    rng = np.random.default_rng([seed, 22, SYNTH_SPLITS[split], index])
    total = round(seconds * SAMPLE_RATE)
    active = max(N_FFT, int(total * rng.uniform(0.3, 1.0)))
    signal = np.zeros(active)
    if split == "heldout":
        families, count, snr_db = (_vowel, _burst), int(rng.integers(2, 5)), rng.uniform(0, 15)
    else:
        families, count, snr_db = (_tone, _chirp), int(rng.integers(1, 4)), rng.uniform(20, 40)
    for _ in range(count):
        size = int(active * rng.uniform(0.2, 0.7))
        start = int(rng.integers(0, active - size + 1))
        make = families[int(rng.integers(len(families)))]
        signal[start:start + size] += rng.uniform(0.3, 1.0) * make(rng, size)
    if split == "heldout":  # silence gaps cut into the sound
        for _ in range(int(rng.integers(1, 4))):
            gap = int(active * rng.uniform(0.03, 0.15))
            at = int(rng.integers(0, active - gap + 1))
            signal[at:at + gap] = 0.0
    power = max(float(np.mean(signal ** 2)), 1e-8)
    noise = _pink(rng, active) if split == "heldout" else rng.standard_normal(active)
    signal += noise * np.sqrt(power / 10 ** (snr_db / 10))
    signal *= rng.uniform(0.05, 0.5) / max(np.abs(signal).max(), 1e-9)
    audio = np.zeros(total, dtype=np.float32)
    audio[:active] = signal[:total]
    return audio



# ---------------------------------------------------------------------------------------------
# speech: sentences spoken by espeak-ng


@dataclass(frozen=True)
class Utterance:
    """One clip: ``text`` spoken by espeak-ng ``voice`` at ``speed`` words per minute, scaled
    to peak ``gain``, under noise at ``snr_db`` (None: clean) drawn from ``noise_seed``."""

    text: str
    voice: str
    speed: int
    gain: float
    snr_db: float | None
    noise_seed: int


def utterances(split: str, count: int, seed: int = 0) -> list[Utterance]:
    """The first ``count`` clips of a speech split: clip i speaks sentence i (cycling), voices
    in turn (shifted by ``seed``); speed, level and noise drawn from ``[seed, 22, split, i]``."""
    if split not in SPEECH_SPLITS:
        raise UserError(f"unknown speech split {split!r}: use {', '.join(SPEECH_SPLITS)}")
    sentences, voices, (slow, fast), noisy, stream = SPEECH_SPLITS[split]
    out = []
    for i in range(count):
        rng = np.random.default_rng([seed, 22, stream, i])
        speed = int(rng.integers(slow, fast + 1))
        gain = round(float(rng.uniform(0.1, 0.8)), 3) if noisy else 0.5
        snr = round(float(rng.uniform(10.0, 20.0)), 2) if noisy and i % 2 else None
        out.append(Utterance(sentences[i % len(sentences)], voices[(i + seed) % len(voices)],
                             speed, gain, snr, int(rng.integers(2**31))))
    return out


@functools.cache
def espeak_version() -> str:
    """espeak-ng's version line; UserError when it is not installed."""
    if shutil.which(ESPEAK) is None:
        raise UserError(NO_ESPEAK)
    done = subprocess.run([ESPEAK, "--version"], capture_output=True, text=True, check=False)
    return done.stdout.strip().split("  Data at")[0]


def resample(audio: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling by FFT: the spectrum cut (or zero-padded) at the new Nyquist.
    Treats the clip as periodic, harmless for speech that starts and ends in silence."""
    if rate == target:
        return np.asarray(audio, np.float32)
    size = max(1, round(len(audio) * target / rate))
    spectrum = np.fft.rfft(np.asarray(audio, np.float64))
    kept = np.zeros(size // 2 + 1, complex)
    n = min(len(kept), len(spectrum))
    kept[:n] = spectrum[:n]
    return (np.fft.irfft(kept, size) * (size / len(audio))).astype(np.float32)


def read_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """(float32 samples in [-1, 1], sample rate) of a 16-bit PCM wav; channels averaged."""
    with wave.open(str(path), "rb") as handle:
        if handle.getsampwidth() != 2:
            raise UserError(f"{path}: {8 * handle.getsampwidth()}-bit wav; this reads 16-bit PCM")
        channels, rate = handle.getnchannels(), handle.getframerate()
        raw = np.frombuffer(handle.readframes(handle.getnframes()), "<i2")
    samples = raw.reshape(-1, channels).mean(axis=1) / 32768.0
    return samples.astype(np.float32), rate


def speak(text: str, voice: str, speed: int) -> np.ndarray:
    """float32 16 kHz audio of espeak-ng saying ``text``."""
    espeak_version()
    with tempfile.TemporaryDirectory(prefix="onnxcomp-espeak-") as scratch:
        path = os.path.join(scratch, "out.wav")
        command = [ESPEAK, "-v", voice, "-s", str(speed), "-w", path, text]
        done = subprocess.run(command, capture_output=True, text=True, check=False,
                              timeout=120)
        if done.returncode != 0 or not os.path.isfile(path):
            lines = [line for line in (done.stderr or "").splitlines() if line.strip()]
            raise UserError(f"espeak-ng failed on voice {voice!r}: "
                            f"{lines[-1] if lines else f'exit code {done.returncode}'}")
        samples, rate = read_wav(path)
    return resample(samples, rate)


def utterance_audio(utterance: Utterance) -> np.ndarray:
    """The clip's float32 16 kHz audio: spoken, scaled, noise added."""
    audio = speak(utterance.text, utterance.voice, utterance.speed).astype(np.float64)
    if utterance.snr_db is not None:
        rng = np.random.default_rng(utterance.noise_seed)
        noise = _pink(rng, len(audio)) if rng.random() < 0.5 else rng.standard_normal(len(audio))
        voiced = np.abs(audio) > 1e-3 * np.abs(audio).max()  # speech power, not its pauses
        power = float(np.mean(audio[voiced] ** 2)) if voiced.any() else 1e-8
        audio = audio + noise * np.sqrt(power / 10 ** (utterance.snr_db / 10))
    return (audio * (utterance.gain / max(np.abs(audio).max(), 1e-9))).astype(np.float32)
