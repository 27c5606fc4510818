"""jdistill: few-step diffusion distillation in JAX/Flax, checked against PyTorch."""

__version__ = "0.1.0"
