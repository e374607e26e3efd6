"""The package version, apart so that the compiler can record it without importing the SDK."""

__version__ = "0.1.0"
