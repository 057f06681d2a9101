"""Triton kernels and their launchers (no autograd, no nn). Imported lazily by the ops."""
