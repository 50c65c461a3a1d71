"""`mixq eval MODEL`: lm-eval's tasks on local data plus mixq's own, the Capability Score, verdicts against
the float reference with standard errors; a markdown table on stdout, lm-eval's result files with --output."""

from __future__ import annotations

from pathlib import Path

from mixq.core.errors import MixqError


def add_arguments(p) -> None:
    p.add_argument("model", nargs="?", help="local model directory, hub id, demo / demo-moe, fixture:KIND, or the "
                                            "http(s) URL of an OpenAI-compatible server")
    p.add_argument("--baseline", help="a model (or server URL) to compare with, e.g. a uniform 4-bit quant")
    p.add_argument("--reference", help="the float model (or server URL): base of the verdicts, reference for kl")
    p.add_argument("--tasks", default="capability",
                   help="comma-separated lm-eval tasks or groups (mmlu, gsm8k_cot, gsm8k, ifeval, humaneval, "
                        "humaneval_instruct, wikitext, ja_leaderboard_jcommonsenseqa, hashhop...), mixq's own (bfcl, "
                        "kl), or 'capability' (mmlu 5-shot, gsm8k_cot 3-shot, ifeval, bfcl, humaneval, hashhop)")
    p.add_argument("--data-dir", help="the benchmarks' official files (DIR/<benchmark>/...: wikitext/wiki.test.raw, "
                                      "mmlu/{dev,test}/*.csv, gsm8k/*.jsonl, ...); default: mixq's shipped samples")
    p.add_argument("--limit", type=int, help="at most N items per task (per subtask, as lm-eval counts)")
    p.add_argument("--num-fewshot", type=int, help="shots for every task (default: each config's; capability: "
                                                   "mmlu 5, gsm8k_cot 3)")
    p.add_argument("--apply-chat-template", action="store_true", help="render prompts with the model's chat "
                                                                      "template (lm-eval's --apply_chat_template)")
    p.add_argument("--kv-config", help="kv_config.json for the model's KV cache (mixq kv-cache)")
    p.add_argument("--server", help="evaluate an OpenAI-compatible server at URL (MODEL is then the model name)")
    p.add_argument("--api-key", help="bearer token sent to every server")
    p.add_argument("--tokenizer", help="tokenizer (model dir or demo name) for servers' log-likelihood tasks and "
                                       "for HashHop's token sizes when no local model is given")
    p.add_argument("--output", "-o", help="directory for lm-eval's result and sample files and the comparison")
    p.add_argument("--no-think", action="store_true", help="render chat prompts with enable_thinking=False")
    p.add_argument("--max-tokens", type=int, help="token budget of every generation (task configs otherwise)")
    p.add_argument("--max-length", type=int, help="context and rolling-window length in tokens (default: the "
                                                  "model's; for servers, that of --tokenizer's model)")
    p.add_argument("--think-tokens", type=int, default=512, help="bfcl: extra budget for reasoning (default 512)")
    p.add_argument("--text", help="text file for kl (default: the shipped held-out text)")
    p.add_argument("--seq-len", type=int, help="kl window length (default 256)")
    p.add_argument("--timeout", type=float, default=10.0, help="humaneval: seconds per program (default 10)")
    p.add_argument("--hashhop-sizes", default="2k,8k,32k", help="HashHop prompt sizes in tokens (default 2k,8k,32k)")
    p.add_argument("--thresholds", help="verdict thresholds RULE=PASS:WARN,... (default points=2:5,"
                                        "relative=0.10:0.25,kl=0.05:0.15)")
    p.add_argument("--seed", type=int, default=0, help="lm-eval's seeds and HashHop's generation (default 0)")
    p.add_argument("--cache-dir", help="result caches and converted data (default ~/.cache/mixq/eval)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write any cache")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON instead of the table")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--list-tasks", action="store_true", help="list the tasks mixq can run and exit")


def _list_tasks() -> int:
    from mixq.eval import registry, scores
    from mixq.eval.lmeval import taskdir

    print("lm-eval tasks on local data:", ", ".join(taskdir.supported_names()))
    print("generated (lm-eval format): hashhop")
    print("mixq's own:", ", ".join(registry.names()))
    print("capability:", ", ".join(scores.CAPABILITY))
    return 0


def _check_numbers(args) -> None:
    for flag in ("limit", "seq_len", "max_tokens", "max_length"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise MixqError(f"--{flag.replace('_', '-')} must be >= 1 (got {v})")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise MixqError(f"--num-fewshot must be >= 0 (got {args.num_fewshot})")
    if args.think_tokens < 0 or args.timeout <= 0:
        raise MixqError("--think-tokens must be >= 0 and --timeout > 0")
    if args.output and Path(args.output).exists() and not Path(args.output).is_dir():
        raise MixqError(f"--output {args.output}: not a directory")


def run(args) -> int:
    if args.quiet or args.json:  # before lm-eval and datasets import tqdm (it reads the variable then)
        import os

        os.environ.setdefault("TQDM_DISABLE", "1")
    from mixq.eval import results
    from mixq.eval.runner import EvalOptions, run_eval

    if args.list_tasks:
        return _list_tasks()
    if args.model is None and not args.server:
        raise MixqError("MODEL is required (or --server URL)")
    _check_numbers(args)
    opts = EvalOptions(
        model=args.model if not args.server else None, baseline=args.baseline, reference=args.reference,
        tasks=args.tasks, data_dir=args.data_dir, limit=args.limit, num_fewshot=args.num_fewshot,
        apply_chat_template=args.apply_chat_template, kv_config=args.kv_config, server=args.server,
        server_model=args.model if args.server else None, api_key=args.api_key, tokenizer=args.tokenizer,
        output=args.output, no_think=args.no_think, seed=args.seed, max_tokens=args.max_tokens,
        max_length=args.max_length,
        think_tokens=args.think_tokens, text=args.text, seq_len=args.seq_len, timeout=args.timeout,
        hashhop_sizes=args.hashhop_sizes, thresholds=args.thresholds, progress=not (args.quiet or args.json))
    if args.no_cache:
        opts.cache_dir = None
    elif args.cache_dir:
        opts.cache_dir = args.cache_dir
    doc = run_eval(opts)
    if args.json:
        print(results.dumps(results.public(doc), indent=1))
    else:
        print(doc["table"])
    return 0
