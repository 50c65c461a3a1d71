"""Hard rules: which tensors never get quantized, whatever the budget.

Kept apart from the choice of bits (as llama.cpp's llama-quant.cpp does): the allocator only ever sees
tensors these rules let through. A reason string is returned for every tensor that stays float.
"""

from __future__ import annotations

SSM_PARAMS = {"A_log": "SSM decay A_log", "D": "SSM skip D", "dt_bias": "SSM dt_bias"}
ROUTER_NAMES = ("gate", "router")


def float_reason(path: str, module, module_path: str, param: str, ndim: int) -> str | None:
    """Why the parameter `param` of `module` (at `module_path`) must stay float; None if quantizable."""
    cls = type(module).__name__
    if param in SSM_PARAMS:
        return SSM_PARAMS[param]
    if "conv1d" in module_path.rsplit(".", 1)[-1] or cls.startswith("Conv"):
        return "conv1d"
    if "Norm" in cls or module_path.rsplit(".", 1)[-1].startswith(("norm", "ln", "layernorm")):
        return "norm"
    if param == "e_score_correction_bias":
        return "router bias"
    if module_path.rsplit(".", 1)[-1] in ROUTER_NAMES or cls in ("MoEGate", "Router"):
        return "MoE router gate"
    if param not in ("weight", "scales", "biases"):
        return f"{param} (kept float beside its layer)" if param == "bias" else f"{param} parameter"
    if not hasattr(module, "to_quantized") and not hasattr(module, "bits"):
        return f"{cls} has no quantized form"
    if ndim < 2:
        return "vector"
    return None
