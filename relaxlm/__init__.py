"""relaxlm: ahead-of-time compiled LLM inference on Apache TVM Relax."""

__version__ = "0.1.0"
