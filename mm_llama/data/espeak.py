"""Text to speech with eSpeak NG, in memory, through the ``espeakng-loader`` wheel.

The wheel ships ``libespeak-ng.so`` and its ``espeak-ng-data`` directory, so no system
package is needed. We call the C API with ``ctypes``: the library is initialised in
synchronous mode (``AUDIO_OUTPUT_SYNCHRONOUS``), and a synth callback copies each
chunk of 16-bit samples into a Python list, so a sentence becomes a numpy array
without touching the sound card or a temporary file.

eSpeak keeps global state (one current voice, one callback), so :class:`ESpeak` is a
process-wide singleton (:func:`espeak`) and is not thread-safe. Its output jitters
slightly (a few samples of timing) with an internal random state that advances with
every synthesis and that ``espeak_ng_SetRandSeed`` does not reset in this build: the
same sequence of requests in a fresh process gives the same bytes, one text spoken twice
in a process does not. Voices are eSpeak
names, optionally with a variant: ``"en-us+f2"`` is American English, female variant 2.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import numpy as np

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE, _PARAM_PITCH = 1, 3
_ERRORS = {1: "internal error", 2: "buffer full", 3: "not found"}  # espeak_ERROR
_Callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class ESpeakError(RuntimeError):
    """eSpeak NG could not be loaded or refused a request (the message says which)."""


@dataclass(frozen=True)
class VoiceSettings:
    """How a sentence is spoken.

    Attributes:
        voice: eSpeak voice name, with an optional ``+variant`` (``"en-us+m3"``).
        rate: speaking rate in words per minute (eSpeak accepts 80..450).
        pitch: base pitch, 0..100 (eSpeak's default is 50).
    """

    voice: str = "en-us"
    rate: int = 175
    pitch: int = 50

    def __post_init__(self) -> None:
        if not 80 <= self.rate <= 450:
            raise ValueError(f"VoiceSettings.rate must be in 80..450 words per minute, got {self.rate}")
        if not 0 <= self.pitch <= 100:
            raise ValueError(f"VoiceSettings.pitch must be in 0..100, got {self.pitch}")


class ESpeak:
    """The eSpeak NG library, initialised for synthesis into memory. Use :func:`espeak`."""

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as exn:  # pragma: no cover - a declared dependency
            raise ESpeakError("espeakng-loader is not installed: pip install espeakng-loader") from exn
        try:
            lib = ctypes.CDLL(espeakng_loader.get_library_path())
        except OSError as exn:
            raise ESpeakError(f"cannot load {espeakng_loader.get_library_path()}: {exn}") from exn
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(),
                                     _INITIALIZE_DONT_EXIT)
        if rate <= 0:
            raise ESpeakError(f"espeak_Initialize failed (returned {rate}) with data {espeakng_loader.get_data_path()}")
        self.sample_rate: int = rate
        self._lib = lib
        self._chunks: list[np.ndarray] = []
        self._callback = _Callback(self._collect)  # kept referenced: the library holds only the pointer
        lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, n: int, events) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0  # 0 = continue synthesis

    def _check(self, code: int, what: str) -> None:
        if code != 0:
            raise ESpeakError(f"eSpeak {what} failed: {_ERRORS.get(code, f'error {code}')}")

    def synthesize(self, text: str, settings: VoiceSettings = VoiceSettings()) -> np.ndarray:
        """Speak ``text``; returns int16 mono samples ``[n]`` at :attr:`sample_rate` Hz.

        Raises:
            ESpeakError: unknown voice, or the synthesis failed.
            ValueError: ``text`` is empty.
        """
        if not text.strip():
            raise ValueError("cannot synthesize empty text")
        self._check(self._lib.espeak_SetVoiceByName(settings.voice.encode()), f"voice {settings.voice!r}")
        self._check(self._lib.espeak_SetParameter(_PARAM_RATE, settings.rate, 0), "set rate")
        self._check(self._lib.espeak_SetParameter(_PARAM_PITCH, settings.pitch, 0), "set pitch")
        data = text.encode("utf-8")
        self._chunks = []
        self._check(self._lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None),
                    "synthesis")
        self._lib.espeak_Synchronize()
        chunks, self._chunks = self._chunks, []
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)


@functools.cache
def espeak() -> ESpeak:
    """The process-wide :class:`ESpeak` (the library has global state)."""
    return ESpeak()
