"""Token-reduction methods: one config dataclass per method, each building a MergePlan.

:data:`METHODS` is the one registry of their names, which the presets, the CLI, ``bench`` and ``eval`` use. A new
method is a file here (a :class:`~tokenmerge.methods.base.MethodConfig` subclass with a ``name``) and a line below.
"""

from .base import MethodConfig
from .importance import ImportanceMerge
from .retom import ReToM
from .sito import SiTo
from .tofu import ToFu
from .tome import ToMe

#: Every method by its name, in the order tools list them.
METHODS: dict[str, type[MethodConfig]] = {cls.name: cls for cls in (ToMe, ImportanceMerge, ReToM, SiTo, ToFu)}

__all__ = ["METHODS", "ImportanceMerge", "MethodConfig", "ReToM", "SiTo", "ToFu", "ToMe"]
