"""llmtailor: fit a causal language model to a device by searching over compression plans."""

from llmtailor.errors import UserError
from llmtailor.plan import CompressionPlan, Distillation, LayerPrecision, LayerSparsity, Student

__all__ = [
    "CompressionPlan",
    "Distillation",
    "LayerPrecision",
    "LayerSparsity",
    "Student",
    "UserError",
]
__version__ = "0.1.0"
