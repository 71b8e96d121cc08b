"""fastcascade: the cascaded 3D U-Net of Roth et al. (2018) for abdominal CT, made fast.

>>> import fastcascade
>>> result = fastcascade.segment("ct.nii.gz")        # doctest: +SKIP
>>> result.save("seg.nii.gz")                        # doctest: +SKIP
"""

from . import phantom
from .api import Predictor, SegmentationResult, load_model, segment
from .config import CLASS_NAMES, CascadeConfig
from .model import UNet3D
from .options import InferenceOptions

__version__ = "0.1.0"

__all__ = [
    "CLASS_NAMES",
    "CascadeConfig",
    "InferenceOptions",
    "Predictor",
    "SegmentationResult",
    "UNet3D",
    "__version__",
    "load_model",
    "phantom",
    "segment",
]
