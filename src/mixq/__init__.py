"""mixq: measured mixed-precision quantization for MLX language models.

Importing mixq first loads an optimized BLAS on Linux (see mixq.core.blas) so every later mlx
matmul on the CPU uses it.
"""

from mixq.core import blas as _blas

_blas.enable()

__version__ = "0.1.0"
