"""edgetune: product feedback in, on-device model out."""

__version__ = "0.1.0"
