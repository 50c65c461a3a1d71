"""`mixq serve MODEL`: an OpenAI-compatible server (chat, completions with echo/logprobs, tools, reasoning)."""

from __future__ import annotations

import logging
import os
import sys

from mixq.core.errors import MixqError


def add_arguments(p) -> None:
    p.add_argument("model", help="local model directory, hub id, demo / demo-moe, or fixture:KIND")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; any other than "
                                                       "loopback needs --api-key)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", default=os.environ.get("MIXQ_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1 routes (default: $MIXQ_API_KEY)")
    p.add_argument("--kv-config", help="kv_config.json from `mixq kv-cache`: mixed-precision KV cache")
    p.add_argument("--kv-quantize-after", type=int, default=0,
                   help="keep each KV cache float until it holds this many tokens (default 0)")
    p.add_argument("--max-concurrency", type=int, default=8,
                   help="sequences decoded at once (batched where the caches allow, else round-robin)")
    p.add_argument("--max-queue", type=int, default=256, help="requests that may wait for a slot (then 429)")
    p.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    p.add_argument("--max-tokens", type=int, help="default max_tokens when a request gives none "
                                                  "(default: the rest of the context)")
    p.add_argument("--thinking-budget", type=int,
                   help="default reasoning-token budget: past it the think block is closed and the answer starts")
    p.add_argument("--prefix-cache-size", type=int, default=16, help="prompt caches kept for reuse (0: off)")
    p.add_argument("--max-body-mb", type=float, default=4.0, help="request body limit in MiB (default 4)")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a request body may take to arrive (default 30; then 408)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a Host name a keyless server answers besides loopback ones (repeatable; * for any)")
    p.add_argument("--served-model-name", help="the model id clients use (default: MODEL as given)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16", "stored"),
                   help="compute dtype (auto: float32 on the CPU, stored dtypes on a GPU)")
    p.add_argument("--no-batch", action="store_true", help="round-robin one sequence at a time per step")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def run(args) -> int:
    from mixq.core.modelio import load
    from mixq.serve.runner import is_loopback

    if not is_loopback(args.host) and not args.api_key:
        raise MixqError(f"refusing to listen on {args.host} without --api-key (only loopback may go without)")
    for name in ("max_concurrency", "max_queue", "max_model_len", "max_tokens", "thinking_budget"):
        v = getattr(args, name)
        if v is not None and v < (0 if name == "thinking_budget" else 1):
            raise MixqError(f"--{name.replace('_', '-')} must be positive, got {v}")
    if not args.body_timeout > 0:
        raise MixqError(f"--body-timeout must be positive, got {args.body_timeout}")
    if not 0 <= args.port <= 65535:
        raise MixqError(f"--port {args.port}: not a port number")

    import mlx.core as mx

    from mixq.serve.app import ServeSettings, context_length, create_app, model_aliases
    from mixq.serve.engine import Engine, make_cache_factory
    from mixq.serve.runner import run_foreground

    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(levelname)s %(name)s: %(message)s")
    dtype = args.dtype
    if dtype == "auto":
        dtype = "float32" if mx.default_device() == mx.cpu else None
    lm = load(args.model, compute_dtype=None if dtype == "stored" else dtype)
    factory = make_cache_factory(lm, args.kv_config, args.kv_quantize_after) if args.kv_config else None
    engine = Engine(lm.model, lm.tokenizer, max_concurrency=args.max_concurrency, max_queue=args.max_queue,
                    prefix_cache_size=args.prefix_cache_size, cache_factory=factory, batched=not args.no_batch)
    model_id = args.served_model_name or args.model
    settings = ServeSettings(model_id=model_id, aliases=model_aliases(args.model, lm.path), api_key=args.api_key,
                             max_body_bytes=int(args.max_body_mb * (1 << 20)), body_timeout_s=args.body_timeout,
                             allowed_hosts=tuple(args.allowed_host),
                             context_length=context_length(lm.config, args.max_model_len),
                             default_max_tokens=args.max_tokens, thinking_budget=args.thinking_budget)
    app = create_app(engine, settings)
    engine.start()

    def ready(port):
        mode = "batched" if engine.batched else "round-robin"
        print(f"mixq serve: {model_id} on http://{args.host}:{port}/v1 ({mode}, max {engine.max_concurrency} "
              f"at once, context {settings.context_length})", file=sys.stderr, flush=True)

    try:
        run_foreground(app, args.host, args.port, log_level="warning" if args.log_level == "info" else args.log_level,
                       on_ready=ready, on_shutdown=engine.stop)
    except OSError as e:
        raise MixqError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from e
    finally:
        engine.stop()
    return 0

