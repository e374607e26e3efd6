"""Fixtures shared by the tests and the benchmark scripts: tiny random-weight checkpoints
(`tiny_models`) and GGUF files written from them (`llama_gguf`).

Not imported by relaxlm itself: these modules need torch and transformers, which only the
`test` extra installs.
"""
