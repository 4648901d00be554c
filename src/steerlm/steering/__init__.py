"""Inference-time activation steering: ops and specs (`ops`), hooks that apply them per row and capture
activations (`hooks`), and attribute vectors built from RM-labeled data (`vectors`)."""

from .hooks import Capture, steer
from .ops import Ablation, Add, LayerSpec, ProjectionCap, SteeringSpec

__all__ = ["Ablation", "Add", "Capture", "LayerSpec", "ProjectionCap", "SteeringSpec", "steer"]
