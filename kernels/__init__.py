"""Triton kernels of fastbegan (installed as ``fastbegan.kernels``).

Only Triton kernels and their thin launchers live here; dispatch, custom-op
registration and autograd live in :mod:`fastbegan.ops`.
"""
