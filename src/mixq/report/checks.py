"""The checks behind `mixq doctor`: what breaks a converted model in mlx-lm, LM Studio or transformers.

What: each `check_*(state)` returns findings: severity (error: that runtime fails to load or run it;
warning: some builds fail or behave wrongly; info), the runtimes affected, a message, the fix, and for a
fixable one an `apply(state)` that edits the in-memory files (mixq.report.doctor writes them).

Why each check (what breaks where):
- `dtype` without `torch_dtype`: transformers 5 writes `dtype`; older transformers (and LM Studio's bundled
  one) only read `torch_dtype`.
- `mode: "affine"` in the quantization block: newer mlx-lm writes it; older loaders reject the key.
  Affine is the default, so dropping it changes nothing for new loaders.
- `{"__float__": "Infinity"}`: recent mlx-lm's `save_config` tags non-finite floats; every other loader
  sees a dict. HF configs write bare `Infinity`.
- nemotron_h without `time_step_limit`: older loaders index it; the default is [0.0, Infinity].
- `tokenizer_class: "TokenizersBackend"` (transformers 5's name): older transformers cannot find the class.
- no chat template (restorable from --base), and a template that opens `<think>` even when thinking is
  turned off (then `/no_think` only works where the engine closes the block, as `mixq serve` does).
- nemotron_h `-` (MLP) layers: transformers builds without them (LM Studio's bundled one) fail with
  `KeyError: '-'`; this is the architecture itself, so the fix is a newer runtime, not an edit.
- config vs weights: the model mlx-lm would build from config.json (its own load path, with the weights
  read lazily, so only headers are touched) against the tensors in the files: per-path quantization entries
  naming no tensor (dropped), per-path bits/group sizes that disagree with the stored shapes (re-derived
  from the shapes when they determine it), and missing, extra or mis-shaped tensors (reported).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from mixq.core.formats import AFFINE_BITS, AFFINE_GROUPS

RUNTIMES = ("mlx-lm", "lmstudio", "transformers")
ALL, OTHERS = RUNTIMES, ("lmstudio", "transformers")
SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
QUANT_KEYS = ("quantization", "quantization_config")
FLOAT_TAG = "__float__"


@dataclass
class Finding:
    check: str
    severity: str
    runtimes: tuple
    message: str
    fix: str
    fixable: bool = False
    fixed: bool = False
    apply: Callable[["State"], None] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("apply")
        d["runtimes"] = list(self.runtimes)
        return d


@dataclass
class State:
    """What the checks read and the fixes change (in memory until written)."""

    path: Path
    config: dict
    tok_config: dict | None
    templates: dict  # file name -> text, for chat_template.jinja / .json
    has_tokenizer_json: bool
    base: dict       # file name -> text from the base model (tokenizer_config.json, chat templates)


def chat_template(templates: dict, tok_config: dict | None) -> str | None:
    """The template transformers would use: chat_template.jinja, chat_template.json, tokenizer_config."""
    if templates.get("chat_template.jinja"):
        return templates["chat_template.jinja"]
    raw = templates.get("chat_template.json")
    t = None
    if raw:
        try:
            t = json.loads(raw).get("chat_template")
        except (json.JSONDecodeError, AttributeError):
            t = None
    if t is None and tok_config:
        t = tok_config.get("chat_template")
    if isinstance(t, list):  # named templates: the default one
        t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
    return t if isinstance(t, str) and t.strip() else None


def _model_type(config: dict) -> str:
    return str(config.get("model_type") or (config.get("text_config") or {}).get("model_type") or "")


# -- checks --------------------------------------------------------------------------------------------
def check_dtype(s: State) -> list[Finding]:
    c = s.config
    if "dtype" not in c or "torch_dtype" in c:
        return []

    def apply(st: State) -> None:
        st.config["torch_dtype"] = st.config["dtype"]
    return [Finding("config.torch_dtype", "warning", OTHERS,
                    f"config.json has `dtype` ({c['dtype']!r}) but no `torch_dtype`, which older loaders read",
                    f"add \"torch_dtype\": {json.dumps(c['dtype'])} beside it", True, apply=apply)]


def _mlx_quant_blocks(config: dict) -> list[dict]:
    return [config[k] for k in QUANT_KEYS if isinstance(config.get(k), dict)
            and ("bits" in config[k] or "group_size" in config[k])]


def check_quant_mode(s: State) -> list[Finding]:
    affine, other = 0, set()
    for block in _mlx_quant_blocks(s.config):
        for entry in [block, *[v for v in block.values() if isinstance(v, dict)]]:
            mode = entry.get("mode")
            if mode == "affine":
                affine += 1
            elif mode is not None:
                other.add(str(mode))
    out = []
    if affine:
        def apply(st: State) -> None:
            for block in _mlx_quant_blocks(st.config):
                for entry in [block, *[v for v in block.values() if isinstance(v, dict)]]:
                    if entry.get("mode") == "affine":
                        del entry["mode"]
        out.append(Finding("quantization.mode", "warning", ("mlx-lm", "lmstudio"),
                           f"the quantization block carries `mode: \"affine\"` ({affine} entries), which older "
                           "mlx-lm / LM Studio loaders reject", "drop the key (affine is the default)", True,
                           apply=apply))
    if other:
        out.append(Finding("quantization.microscaled", "info", ("mlx-lm", "lmstudio"),
                           f"uses {', '.join(sorted(other))}: only mlx / mlx-lm builds that know these formats "
                           "can load it", "use a recent mlx-lm / LM Studio MLX runtime (not fixable in the files)"))
    return out


def _has_tagged(obj: Any) -> bool:
    if isinstance(obj, dict):
        return set(obj) == {FLOAT_TAG} or any(_has_tagged(v) for v in obj.values())
    return isinstance(obj, list) and any(_has_tagged(v) for v in obj)


def _untag(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {FLOAT_TAG} and obj[FLOAT_TAG] in ("NaN", "Infinity", "-Infinity"):
            return float(obj[FLOAT_TAG].replace("Infinity", "inf").replace("NaN", "nan"))
        return {k: _untag(v) for k, v in obj.items()}
    return [_untag(v) for v in obj] if isinstance(obj, list) else obj


def check_tagged_floats(s: State) -> list[Finding]:
    if not _has_tagged(s.config):
        return []

    def apply(st: State) -> None:
        st.config = _untag(st.config)
    return [Finding("config.tagged_floats", "error", OTHERS,
                    "config.json writes non-finite numbers as {\"__float__\": ...} (recent mlx-lm's save_config); "
                    "other loaders read a dict where a number belongs",
                    "write them as bare Infinity / NaN, as Hugging Face configs do", True, apply=apply)]


def check_time_step_limit(s: State) -> list[Finding]:
    if not _model_type(s.config).startswith("nemotron_h") or "time_step_limit" in s.config:
        return []

    def apply(st: State) -> None:
        st.config["time_step_limit"] = [0.0, math.inf]
    return [Finding("nemotron_h.time_step_limit", "warning", ALL,
                    "nemotron_h config without `time_step_limit`, which older loaders index directly",
                    "add \"time_step_limit\": [0.0, Infinity] (the default value)", True, apply=apply)]


def _pattern(config: dict) -> str | None:
    pat = config.get("hybrid_override_pattern")
    if pat is not None:
        return "".join(pat)
    types = config.get("layers_block_type")
    if isinstance(types, list):
        return "".join({"mlp": "-", "mamba": "M", "attention": "*", "moe": "E"}.get(t, "?") for t in types)
    return None


def check_mlp_layers(s: State) -> list[Finding]:
    pat = _pattern(s.config) if _model_type(s.config).startswith("nemotron_h") else None
    if not pat or "-" not in pat:
        return []
    return [Finding("nemotron_h.mlp_layers", "error", OTHERS,
                    f"layer pattern {pat} has {pat.count('-')} `-` (MLP) layers: transformers builds without "
                    "Nemotron-H MLP layers (LM Studio's bundled one among them) fail with KeyError: '-'",
                    "not fixable in the files (the layers are the architecture): update LM Studio's runtime / "
                    "transformers to a build that supports `-` layers, or run it with mlx-lm or `mixq serve`")]


def check_tokenizer_class(s: State) -> list[Finding]:
    if s.tok_config is None:
        base = s.base.get("tokenizer_config.json")

        def apply(st: State) -> None:
            st.tok_config = json.loads(base)
        return [Finding("tokenizer.config", "warning", ALL, "no tokenizer_config.json (special tokens, chat template)",
                        "copy it from the base model" if base else "pass --base BASE_MODEL to restore it",
                        base is not None, apply=apply if base else None)]
    if s.tok_config.get("tokenizer_class") != "TokenizersBackend":
        return []
    base_cls = None
    if s.base.get("tokenizer_config.json"):
        base_cls = json.loads(s.base["tokenizer_config.json"]).get("tokenizer_class")
        base_cls = None if base_cls in (None, "TokenizersBackend") else base_cls
    cls = base_cls or ("PreTrainedTokenizerFast" if s.has_tokenizer_json else None)

    def apply(st: State) -> None:
        st.tok_config["tokenizer_class"] = cls
    how = (f"restore the base model's {cls!r}" if base_cls else
           f"set {cls!r} (tokenizer.json is present; pass --base for the original class)" if cls else
           "pass --base BASE_MODEL to restore the original class")
    return [Finding("tokenizer.class", "warning", ALL,
                    "tokenizer_config.json names `TokenizersBackend` (transformers 5); older transformers cannot "
                    "find that class", how, cls is not None, apply=apply if cls else None)]


def check_chat_template(s: State) -> list[Finding]:
    if chat_template(s.templates, s.tok_config) is not None:
        return []
    base_t = chat_template({k: v for k, v in s.base.items() if k in TEMPLATE_FILES},
                           json.loads(s.base["tokenizer_config.json"]) if "tokenizer_config.json" in s.base else None)

    def apply(st: State) -> None:
        for n in TEMPLATE_FILES:
            if n in st.base:
                st.templates[n] = st.base[n]
        if chat_template(st.templates, st.tok_config) is None and st.tok_config is not None:
            st.tok_config["chat_template"] = base_t
    return [Finding("tokenizer.chat_template", "warning", ALL,
                    "no chat template: chat clients and /v1/chat/completions cannot format conversations",
                    "restore it from the base model" if base_t else "pass --base BASE_MODEL to restore it",
                    base_t is not None, apply=apply if base_t else None)]


def _render(template: str, tok: dict | None, **kw) -> str:
    from datetime import datetime as _dt

    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: _dt.now().strftime(f))
    specials = {k: v for k, v in (tok or {}).items() if k.endswith("_token") and isinstance(v, str)}
    return env.from_string(template).render(**specials, **kw)


def check_think(s: State) -> list[Finding]:
    t = chat_template(s.templates, s.tok_config)
    if t is None or "<think>" not in t:
        return []
    msgs = [{"role": "system", "content": "/no_think"}, {"role": "user", "content": "Hello"}]
    try:
        text = _render(t, s.tok_config, messages=msgs, add_generation_prompt=True, enable_thinking=False)
    except Exception as e:  # a template that needs more than this renderer offers: say so, do not guess
        return [Finding("tokenizer.think", "info", ALL, f"could not render the chat template to check thinking "
                        f"control ({str(e).splitlines()[0] if str(e) else type(e).__name__})", "none needed")]
    i = text.rfind("<think>")
    if i < 0 or "</think>" in text[i:]:
        return []
    return [Finding("tokenizer.think", "warning", ALL,
                    "the chat template opens <think> even with /no_think and enable_thinking=false, so turning "
                    "reasoning off needs the engine to close the block",
                    "serve with `mixq serve` (closes the block when thinking is off), or edit the template to "
                    "honour enable_thinking")]


def probe_weights(model_dir: Path) -> dict:
    """mlx-lm's own build of the model from config.json, against the weight files (lazy: headers only).

    Returns {"expected": path -> shape, "got": path -> shape, "quantized": path -> (bits, group, mode)}.
    """
    import inspect

    from mlx.utils import tree_flatten
    from mlx_lm import utils

    default = inspect.signature(utils.load_model).parameters["get_model_classes"].default
    seen: dict = {}

    def classes(config):
        model_class, args_class = default(config=config)

        def load_weights(self, weights, strict=True):
            seen["expected"] = {k: tuple(v.shape) for k, v in tree_flatten(self.parameters())}
            seen["got"] = {k: tuple(v.shape) for k, v in weights}
            seen["quantized"] = {n: (m.bits, m.group_size, getattr(m, "mode", "affine"))
                                 for n, m in self.named_modules() if hasattr(m, "bits") and hasattr(m, "group_size")}
            return self
        return type(model_class.__name__, (model_class,), {"load_weights": load_weights}), args_class

    utils.load_model(Path(model_dir), lazy=True, strict=False, get_model_classes=classes)
    return seen


def _per_path(config: dict) -> dict:
    q = config.get("quantization")
    return {k: v for k, v in q.items() if isinstance(v, (dict, bool))} if isinstance(q, dict) else {}


def _set_entry(st: State, module: str, entry: Any) -> None:
    for k in QUANT_KEYS:
        block = st.config.get(k)
        if isinstance(block, dict) and ("bits" in block or "group_size" in block):
            if entry is None:
                block.pop(module, None)
            else:
                block[module] = dict(entry)


def _inferred(module: str, p: dict, bits_now: int) -> dict | None:
    """bits / group size that the stored affine shapes of `module` imply, or None."""
    w, sc, bi = (p["got"].get(f"{module}.{n}") for n in ("weight", "scales", "biases"))
    exp = p["expected"].get(f"{module}.weight")
    if not (w and sc and bi and exp):
        return None
    in_dims = exp[-1] * 32 // bits_now
    bits, group = w[-1] * 32 / in_dims, in_dims / sc[-1]
    if bits in AFFINE_BITS and group in AFFINE_GROUPS:
        return {"group_size": int(group), "bits": int(bits)}
    return None


def check_weights(s: State) -> list[Finding]:
    try:
        p = probe_weights(s.path)
    except Exception as e:  # the config cannot build a model: that is the finding
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return [Finding("weights.build", "error", ALL, f"mlx-lm cannot build the model from config.json: {first}",
                        "correct config.json (compare with the base model's)")]
    out = []
    got = p["got"]
    orphans = sorted(m for m in _per_path(s.config) if not any(k.startswith(m + ".") for k in got))
    if orphans:
        def drop(st: State, names=tuple(orphans)) -> None:
            for m in names:
                _set_entry(st, m, None)
        out.append(Finding("weights.orphan_quant_entries", "warning", ALL,
                           f"{len(orphans)} per-path quantization entries name no tensor in the weights: "
                           + ", ".join(orphans[:3]) + (" ..." if len(orphans) > 3 else ""),
                           "drop those entries", True, apply=drop))
    bad = sorted(k for k in set(got) & set(p["expected"]) if got[k] != p["expected"][k])
    by_module: dict[str, list[str]] = {}
    for k in bad:
        by_module.setdefault(k.rsplit(".", 1)[0], []).append(k)
    for module, keys in sorted(by_module.items()):
        q = p["quantized"].get(module)
        entry = _inferred(module, p, q[0]) if q and q[2] == "affine" else None
        shapes = "; ".join(f"{k}: config gives {list(p['expected'][k])}, file has {list(got[k])}" for k in keys[:2])
        if entry:
            out.append(Finding("weights.quant_shape", "error", ALL,
                               f"{module}: quantized as {q[0]} bits / group {q[1]} by the config, but the stored "
                               f"shapes are {entry['bits']} bits / group {entry['group_size']} ({shapes})",
                               f"set its quantization entry to {json.dumps(entry)}", True,
                               apply=lambda st, m=module, e=entry: _set_entry(st, m, e)))
        else:
            out.append(Finding("weights.shape", "error", ALL, f"{module}: {shapes}",
                               "re-convert the model (the stored shapes do not follow from its config)"))
    for kind, keys in (("missing", sorted(set(p["expected"]) - set(got))), ("extra", sorted(set(got) - set(p["expected"])))):
        if keys:
            what = "the model needs, missing from the weight files" if kind == "missing" else \
                "in the weight files that the model does not have"
            out.append(Finding(f"weights.{kind}", "error", ALL,
                               f"{len(keys)} tensors {what}: " + ", ".join(keys[:3]) + (" ..." if len(keys) > 3 else ""),
                               "re-convert the model, or fix config.json to match the weights"))
    return out


CHECKS = (check_dtype, check_quant_mode, check_tagged_floats, check_time_step_limit, check_mlp_layers,
          check_tokenizer_class, check_chat_template, check_think, check_weights)


def run_checks(s: State, runtimes: tuple = RUNTIMES) -> list[Finding]:
    found = [f for check in CHECKS for f in check(s) if set(f.runtimes) & set(runtimes)]
    return sorted(found, key=lambda f: SEVERITY_ORDER[f.severity])
