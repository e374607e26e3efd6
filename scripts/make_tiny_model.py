"""Write a tiny random-weight Hugging Face checkpoint (config, safetensors, tokenizer).

    python scripts/make_tiny_model.py OUT_DIR [--arch LlamaForCausalLM] [--tokenizer spm] [--tiny]

The builders live in relaxlm.testing.tiny_models, which the tests import too.
"""

import sys

try:
    from relaxlm.testing.tiny_models import main
except ModuleNotFoundError as error:
    if error.name not in ("torch", "transformers"):
        raise
    # The first README command installs the runtime only; random weights need torch.
    sys.exit(
        f"make_tiny_model.py needs {error.name} (the `test` extra): "
        "pip install torch==2.13.0 'transformers>=4.56,<6'  (or pip install -e '.[test]')"
    )

if __name__ == "__main__":
    main()
