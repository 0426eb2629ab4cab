"""tokenmerge: training-free token merging for diffusion models in Hugging Face diffusers.

>>> import tokenmerge
>>> tokenmerge.apply(pipe, tokenmerge.ImportanceMerge(ratio=0.7))
>>> image = pipe(prompt).images[0]
>>> tokenmerge.remove(pipe)
"""

from . import presets
from .api import apply, current_config, patched, remove, skipped_blocks
from .calibrate import AutoRatio, auto_ratio
from .methods import ImportanceMerge, ReToM, SiTo, ToFu, ToMe
from .state import PlanEvent

__version__ = "0.1.0"
__all__ = [
    "presets", "apply", "remove", "patched", "current_config", "skipped_blocks", "auto_ratio", "AutoRatio",
    "ToMe", "ImportanceMerge", "ToFu", "SiTo", "ReToM", "PlanEvent", "__version__",
]
