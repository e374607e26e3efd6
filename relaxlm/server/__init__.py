"""The OpenAI-compatible HTTP server (`relaxlm serve`): see app.py."""
