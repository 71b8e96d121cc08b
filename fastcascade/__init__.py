"""fastcascade: the cascaded 3D U-Net of Roth et al. (2018) for abdominal CT, made fast."""

from .config import CLASS_NAMES, CascadeConfig
from .model import UNet3D

__version__ = "0.1.0"

__all__ = ["CLASS_NAMES", "CascadeConfig", "UNet3D", "__version__"]
