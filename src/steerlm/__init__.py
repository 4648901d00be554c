"""steerlm: the end-to-end SteerLM alignment pipeline, HF-native."""

from . import resources  # noqa: F401 -- registers the ${bundled:...} config resolver before any config resolves

__version__ = "0.1.0"
