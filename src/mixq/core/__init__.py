"""Model I/O, anatomy (layer kinds, tensors, cache slots), formats and bits-per-weight accounting.

Kept free of mlx imports at package level so mixq.core.blas can run before mlx loads.
"""
