from .unet3d import ConvBNReLU, UNet3D

__all__ = ["ConvBNReLU", "UNet3D"]
