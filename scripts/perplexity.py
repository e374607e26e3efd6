"""Perplexity of quantization schemes on real weights, relaxlm and llama.cpp side by side.

    python scripts/perplexity.py TEXT_FILE [--model M.gguf] [--window 512] [--stride 256]

The comparison lives in relaxlm.testing.perplexity, which the tests import too (it needs
llama-cpp-python, from the `test` extra).
"""

from relaxlm.testing.perplexity import main

if __name__ == "__main__":
    main()
