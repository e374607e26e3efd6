"""Perplexity of quantization schemes on real weights, relaxlm and llama.cpp side by side.

From one GGUF model (default: SmolLM2-135M-Instruct Q4_1, the default model):
  float32        relaxlm on the GGUF's weights dequantized to float32 (the baseline)
  q8, q4, q4-a8  relaxlm's own schemes applied to those float32 weights (q4-a8: q4 weights,
                 int8 activations, as llama.cpp computes Q4_0)
  gguf           relaxlm on the GGUF as it is (its llama.cpp blocks kept)
  llama.cpp      llama-cpp-python on the same GGUF file
  llama.cpp Q4_0 llama.cpp's Q4_0 made from the float32 weights (compare with q4)
Same token ids, same windows for all. Text: any file; the tests use Debian's
/usr/share/common-licenses/GPL-3.

    python scripts/perplexity.py TEXT_FILE [--model M.gguf] [--window 512] [--stride 256]
"""

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

import relaxlm
from relaxlm.compiler.quantization import GGUF_SCHEMES, dequantize
from relaxlm.frontends.gguf import load_gguf
from relaxlm.perplexity import Perplexity, perplexity_of_ids


def write_dequantized_checkpoint(gguf_path: str | Path, out: str | Path) -> Path:
    """An HF folder (config.json, model.safetensors in float32, tokenizer) of a GGUF's weights."""
    from safetensors.numpy import save_file

    checkpoint = load_gguf(Path(gguf_path))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, info in checkpoint.tensors.items():
        array = checkpoint.read(name)  # block rows are un-permuted already
        if info.ggml_type in GGUF_SCHEMES:
            array = dequantize(GGUF_SCHEMES[info.ggml_type], [array], info.shape[-1])
        tensors[name] = np.ascontiguousarray(array, dtype=np.float32)
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({**checkpoint.config, "dtype": "float32"}))
    for file in checkpoint.tokenizer_files:
        shutil.copyfile(file, out / file.name)
    return out


def llama_cpp_scorer(model_path: str | Path, window: int):
    """logits_of(ids) for perplexity_of_ids, from llama-cpp-python."""
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(model_path), logits_all=True, n_ctx=window, n_batch=window, verbose=False
    )

    def logits_of(ids: list[int]) -> np.ndarray:
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])

    return logits_of


def relaxlm_scorer(llm: relaxlm.LLM):
    def logits_of(ids: list[int]) -> np.ndarray:
        return llm.score(ids, prefill=len(ids), every_token=True)[: len(ids)]

    return logits_of


def compare(
    text: str,
    model: str | Path,
    workdir: str | Path,
    window: int = 512,
    stride: int = 256,
    which: tuple[str, ...] = (
        "float32",
        "q8",
        "q4",
        "q4-a8",
        "gguf",
        "llama.cpp",
        "llama.cpp Q4_0",
    ),
) -> dict[str, Perplexity]:
    """Perplexity per configuration (see the module docstring), over the same token ids."""
    from relaxlm.testing.llama_gguf import quantize_gguf, write_llama_gguf

    workdir = Path(workdir)
    native = relaxlm.LLM(str(model))
    ids = native.tokenizer.encode(text)
    results: dict[str, Perplexity] = {}
    if "gguf" in which:
        results["gguf"] = perplexity_of_ids(ids, relaxlm_scorer(native), window, stride)
    if "llama.cpp" in which:
        results["llama.cpp"] = perplexity_of_ids(
            ids, llama_cpp_scorer(model, window), window, stride
        )
    floats = None
    for quant in ("float32", "q8", "q4", "q4-a8"):
        if quant not in which:
            continue
        floats = floats or write_dequantized_checkpoint(model, workdir / "float32")
        llm = relaxlm.LLM(str(floats), quant="none" if quant == "float32" else quant)
        results[quant] = perplexity_of_ids(ids, relaxlm_scorer(llm), window, stride)
        del llm
    if "llama.cpp Q4_0" in which:
        floats = floats or write_dequantized_checkpoint(model, workdir / "float32")
        f32 = write_llama_gguf(floats, workdir / "float32.gguf", ftype="F32")
        q4_0 = quantize_gguf(f32, workdir / "q4_0.gguf", "Q4_0")
        scorer = llama_cpp_scorer(q4_0, window)
        results["llama.cpp Q4_0"] = perplexity_of_ids(ids, scorer, window, stride)
    return results


def main() -> None:
    from relaxlm.default_model import default_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("text", help="text file")
    ap.add_argument("--model", help="GGUF file (default: the default model)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    args = ap.parse_args()
    text = Path(args.text).read_text(encoding="utf-8", errors="replace")
    with tempfile.TemporaryDirectory(prefix="relaxlm-ppl-") as workdir:
        model = args.model or default_model()
        results = compare(text, model, workdir, args.window, args.stride)
    print(f"{'configuration':<16} {'tokens':>7} {'bits/token':>11} {'perplexity':>11}")
    for name, p in results.items():
        print(f"{name:<16} {p.tokens:>7} {p.bits_per_token:>11.4f} {p.perplexity:>11.3f}")


if __name__ == "__main__":
    main()
