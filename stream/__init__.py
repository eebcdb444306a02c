"""stream: real-time streaming video diffusion."""

__version__ = "0.1.0"
