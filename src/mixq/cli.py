"""The `mixq` command: parse arguments, dispatch to one module per subcommand, turn MixqError into one line.

Importing mixq (which happens first here) loads a fast BLAS before mlx; see mixq.core.blas.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import mixq
from mixq.core.errors import MixqError

# subcommand -> module under mixq.commands; each has add_arguments(parser) and run(args) -> int
COMMANDS = {
    "convert": "Measure sensitivity, allocate formats under a bits-per-weight budget, write and verify",
    "inspect": "Show a model's layers, kinds, cache slots and quantizable tensors",
    "serve": "OpenAI-compatible server: chat (reasoning split, tools), completions with logprobs, batching",
    "kv-cache": "Measure K/V sensitivity per attention layer and write a mixed-bit kv_config.json",
    "eval": "Benchmarks, Capability Score, deltas vs a baseline and verdicts vs the float reference",
    "lm-eval": "lm-evaluation-harness's CLI with the mixq model registered and tasks fed from local files",
    "bench": "Prompt and generation speed, time to first token and peak memory, saved to MODEL/mixq/bench.json",
    "card": "Write a Hugging Face model card (README.md) from the model's convert/eval/bench/kv results",
    "doctor": "Find (and with --fix repair) what breaks a converted model in other runtimes",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other user error
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mixq", description="Measured mixed-precision quantization for MLX.")
    parser.add_argument("--version", action="version", version=f"mixq {mixq.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"mixq.commands.{name.replace('-', '_')}")
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except MixqError as e:
        print(f"mixq {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # output piped into head & co.
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"mixq {args.command}: interrupted", file=sys.stderr)
        return 130
