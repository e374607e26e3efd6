"""Logit agreement with llama.cpp on one GGUF file, per relaxlm --quant (top-1, max |diff|).

    python scripts/agreement.py [--model M.gguf] [--quant none q4-a8] [--tokens 32]
                                [--llama-cpp-variants]

The comparison lives in relaxlm.testing.agreement (it needs llama-cpp-python, from the `test`
extra).
"""

from relaxlm.testing.agreement import main

if __name__ == "__main__":
    main()
