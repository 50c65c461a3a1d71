"""Find, validate and load models: local dirs, the bundled demo models, and hub ids.

Validation happens before mlx-lm sees the files so that the usual mistakes (missing dir, broken
config.json, unknown model_type, truncated safetensors) give one clear line instead of a traceback.
On the CPU every floating weight is cast to float32: bf16 matmuls are slow there and bf16 MoE fails.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixq.core.errors import MixqError

DEMO_MODELS = {"demo": "demo", "demo-moe": "demo_moe"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
HUB_PATTERNS = ["*.json", "model*.safetensors", "*.py", "tokenizer.model", "*.tiktoken", "*.txt", "*.jsonl", "*.jinja"]


def demo_dir(name: str) -> Path:
    return Path(__file__).resolve().parent.parent / "demo" / "models" / DEMO_MODELS[name]


def resolve_model(name: str | os.PathLike, *, revision: str | None = None) -> Path:
    """A local directory, `demo`/`demo-moe`, or a hub id (downloaded through huggingface_hub)."""
    name = str(name)
    if name.startswith("fixture:"):
        return _fixture(name.split(":", 1)[1])
    if name in DEMO_MODELS:
        path = demo_dir(name)
        if not (path / "config.json").is_file():
            raise MixqError(f"{name}: the bundled demo model is missing from this install ({path})")
        return path
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise MixqError(f"{name}: not a model directory")
        return path
    if not HUB_ID.match(name) or name.startswith((".", "/", "~")):
        raise MixqError(f"{name}: no such model directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=name, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline, missing repo, auth: all user-facing
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MixqError(f"{name}: not a local directory and could not be fetched from the hub: {first}") from e


def _fixture(kind: str) -> Path:
    """A tiny random-weight fixture model (see mixq.core.synth), built once into the user cache."""
    from mixq.core import synth

    if kind not in synth.FIXTURES:
        raise MixqError(f"unknown fixture {kind!r}; choose from {', '.join(synth.FIXTURES)}")
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mixq" / "fixtures" / kind
    if not (cache / "config.json").is_file():
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        synth.build_fixture(kind, tmp)
        os.replace(tmp, cache) if not cache.exists() else None
    return cache


def read_config(path: Path) -> dict:
    from mixq.core.jsonfile import read_json

    cfg = path / "config.json"
    config = read_json(cfg, missing=f"{path}: no config.json")
    if not isinstance(config, dict):
        raise MixqError(f"{cfg}: expected a JSON object")
    if "model_type" not in config:
        text_cfg = config.get("text_config")
        if not (isinstance(text_cfg, dict) and "model_type" in text_cfg):
            raise MixqError(f"{cfg}: no model_type")
    return config


def check_model_type(config: dict) -> str:
    """The mlx-lm module name for this config, or a clear error when mlx-lm has no such architecture."""
    from mlx_lm import utils as lm_utils

    model_type = config.get("model_type") or config.get("text_config", {}).get("model_type")
    remap = getattr(lm_utils, "MODEL_REMAPPING", {})
    module = remap.get(model_type, model_type)
    if not isinstance(module, str) or not re.fullmatch(r"[A-Za-z0-9_]+", module):
        raise MixqError(f"unknown model_type {model_type!r}")
    try:
        importlib.import_module(f"mlx_lm.models.{module}")
    except ImportError as e:
        raise MixqError(f"model_type {model_type!r} is not supported by the installed mlx-lm") from e
    return module


def check_safetensors(file: Path) -> int:
    """Validate a safetensors header and that the file holds all the data it declares; returns tensor count."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise MixqError(f"{file}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise MixqError(f"{file}: truncated safetensors file (header needs {n} bytes, file has {size})")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MixqError(f"{file}: corrupt safetensors header ({e})") from e
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    need = 8 + n + max(ends, default=0)
    if size < need:
        raise MixqError(f"{file}: truncated safetensors file ({size} bytes, expected {need})")
    return len(ends)


def validate_model_dir(path: Path) -> dict:
    """Check config and weight files without loading weights; returns the parsed config."""
    config = read_config(path)
    check_model_type(config)
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise MixqError(f"{path}: no model*.safetensors weight files")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            wanted = set(json.loads(index.read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise MixqError(f"{index}: not a valid weight index ({e})") from e
        missing = sorted(w for w in wanted if not (path / w).is_file())
        if missing:
            raise MixqError(f"{path}: weight index names missing files: {', '.join(missing)}")
    for f in files:
        check_safetensors(f)
    return config


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    config: dict
    path: Path
    name: str
    # dtype of every parameter as stored on disk (before the float32 compute cast): what a written
    # model keeps for float tensors and what affine scales/biases inherit
    source_dtypes: dict = field(default_factory=dict)
    weights: Any = None  # LazyWeights: fresh unread arrays from the files, for passes that stream

    def runner(self, *, retain: bool = True, check: bool = True, compute_dtype: str | None = "float32"):
        """A BlockRunner over this model; retain=False streams every block from the files."""
        from mixq.core.forward import BlockRunner

        return BlockRunner(self.model, check=check, compute_dtype=compute_dtype, source=self.weights, retain=retain)


def cast_floats(model, dtype) -> None:
    """Cast floating parameters (not packed quantized weights) to `dtype`, in place."""
    import mlx.core as mx
    from mlx.utils import tree_map

    model.update(tree_map(lambda a: a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a,
                          model.parameters()))


def load(name: str | os.PathLike, *, compute_dtype: str | None = "float32", lazy: bool = False,
         revision: str | None = None) -> LoadedModel:
    """Resolve, validate and load with mlx-lm; cast floats to `compute_dtype` (None keeps stored dtypes).

    `lazy=True` with `compute_dtype=None` reads nothing: weights come from the files as passes use them."""
    import mlx.core as mx
    from mlx_lm import load as lm_load

    path = resolve_model(name, revision=revision)
    validate_model_dir(path)
    try:
        model, tokenizer, config = lm_load(path_or_hf_repo=str(path), lazy=lazy, return_config=True)
    except (ValueError, FileNotFoundError, KeyError, json.JSONDecodeError) as e:
        raise MixqError(f"{path}: mlx-lm could not load this model: {str(e).splitlines()[0] if str(e) else e!r}") from e
    from mlx.utils import tree_flatten

    source = {k: str(v.dtype).rsplit(".", 1)[-1] for k, v in tree_flatten(model.parameters())}
    if compute_dtype is not None:
        cast_floats(model, getattr(mx, compute_dtype))
    from mixq.core.weights import LazyWeights

    return LoadedModel(model=model, tokenizer=tokenizer, config=config, path=path, name=str(name),
                       source_dtypes=source, weights=LazyWeights(path, model))


def load_quantized(path: Path, compute_dtype: str = "float32"):
    """A written quantized model as stock mlx-lm builds it (lazy: arrays are read when used), its floats
    (scales and biases too) cast to `compute_dtype`; the packed codes stay."""
    import mlx.core as mx
    from mlx_lm.utils import load_model

    model, _ = load_model(model_path=Path(path), lazy=True)
    cast_floats(model, getattr(mx, compute_dtype))
    return model


def fingerprint(path: Path) -> str:
    """sha256 over config.json, every weight file's safetensors header and size, and 16 evenly spaced
    64 KiB samples of its data: content-bound (two fine-tunes of one shape differ) yet cheap on big files."""
    import hashlib

    h = hashlib.sha256()
    h.update((path / "config.json").read_bytes())
    for f in sorted(path.glob("model*.safetensors")):
        size = f.stat().st_size
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            h.update(f.name.encode())
            h.update(fh.read(n))
            start, chunk = 8 + n, 1 << 16
            span = max(0, size - start - chunk)
            for i in range(16):
                fh.seek(start + span * i // 15)
                h.update(fh.read(chunk))
        h.update(str(size).encode())
    return h.hexdigest()


def check_finite(model) -> None:
    """NaN/Inf anywhere in the floating weights is a broken model: refuse it by name."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    for k, v in tree_flatten(model.parameters()):
        if mx.issubdtype(v.dtype, mx.floating) and not mx.isfinite(v).all().item():
            raise MixqError(f"weight {k} contains NaN or Inf")
