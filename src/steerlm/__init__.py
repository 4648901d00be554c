"""steerlm: the end-to-end SteerLM alignment pipeline, HF-native."""

__version__ = "0.1.0"
