"""Opening a role: a local model (mixq.eval.backend) or an OpenAI-compatible server (mixq.eval.server),
and the lm-eval model that drives the same weights or server for lm-eval's tasks."""

from __future__ import annotations

from mixq.core.errors import MixqError


def _is_url(spec: str) -> bool:
    return str(spec).startswith(("http://", "https://"))


def open_backend(role: str, spec: str, opts):
    if _is_url(spec):
        from mixq.eval.server import ServerBackend

        name = opts.server_model if role == "model" or opts.server_model else None
        return ServerBackend(spec, model=name, no_think=opts.no_think, chat=True, api_key=opts.api_key)
    from mixq.core.modelio import load
    from mixq.eval.backend import LocalBackend

    kv = opts.kv_config if role == "model" else None
    return LocalBackend(load(spec), no_think=opts.no_think, kv_config=kv, chat=True)


def tokenizer_dir(opts, spec: str) -> str | None:
    """A server's tokenizer for lm-eval's log-likelihood requests: --tokenizer, else none."""
    if not opts.tokenizer:
        return None
    from mixq.core.modelio import resolve_model

    return str(resolve_model(opts.tokenizer))


def lm_eval_model(backend, spec: str, opts, needs_tokenizer: bool):
    if backend.kind == "local":
        from mixq.eval.lmeval.model import MixqLM

        return MixqLM(backend=backend, quiet=not opts.progress, max_length=opts.max_length)
    from mixq.eval.lmeval.server import server_lm

    tok = tokenizer_dir(opts, spec)
    if tok is None and needs_tokenizer:
        raise MixqError("log-likelihood tasks through a server need the model's tokenizer: pass --tokenizer "
                        "(a model directory or demo name)")
    # lm-eval's API models keep 2 tokens of max_length back (one generated): --max-length N gives the local
    # model's rolling windows of N; by default the whole context of the tokenizer's model, less those 2
    window = opts.max_length + 2 if opts.max_length else (_context(tok) if tok else None)
    return server_lm(spec, backend.model, api_key=opts.api_key, tokenizer=tok, chat=bool(opts.apply_chat_template),
                     max_length=window)


def _context(model_dir: str) -> int | None:
    """The context length in a model directory's config (the local model's default max_length)."""
    from pathlib import Path

    from mixq.core.modelio import read_config

    try:
        cfg = read_config(Path(model_dir))
    except MixqError:
        return None
    v = cfg.get("max_position_embeddings") or (cfg.get("text_config") or {}).get("max_position_embeddings")
    return int(v) if v else None
