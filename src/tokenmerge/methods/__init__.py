"""Token-reduction methods: one config dataclass per method, each building a MergePlan."""

from .importance import ImportanceMerge
from .retom import ReToM
from .sito import SiTo
from .tofu import ToFu
from .tome import ToMe

__all__ = ["ToMe", "ImportanceMerge", "ToFu", "SiTo", "ReToM"]
