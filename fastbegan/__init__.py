"""fastbegan: the fastest way to train BEGAN, and fused Triton conv+ELU kernels."""
__version__ = "0.1.0"
