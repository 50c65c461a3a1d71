"""Train the embedded demo models: tiny NVIDIA Nemotron-H hybrids (mlx-lm `nemotron_h`) from scratch.

    python -m mixq.demo.train [--corpus DIR] [--out DIR] [--seed 0] [--variant dense|moe|both] [--steps N]

Data: the train split of the offline corpus (mixq.core.corpus; the last 5 % of every file's lines is held out
and never seen here) as plain text windows, mixed with synthetic chat turns rendered with the shipped chat
template (mixq.demo.chatdata). Deterministic from --seed: mx.random.seed for the weights, a numpy Generator for
the batches. Writes one mlx-lm model dir per variant (config.json, model.safetensors in bfloat16, tokenizer
files) and a train_log.json with the loss curve.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import mixq  # noqa: F401  (loads the fast BLAS before mlx)
from mixq.core.corpus import CorpusFile, find_corpus_dir, load_corpus
from mixq.core.tokenizer import BOS, IM_END, PAD, train_bpe, write_tokenizer
from mixq.demo.chatdata import build_turns, render_turn

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.models.nemotron_h import Model, ModelArgs  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "models"
VOCAB_SIZE = 6144

_COMMON = {
    "model_type": "nemotron_h",
    "architectures": ["NemotronHForCausalLM"],
    "torch_dtype": "bfloat16",
    "attention_bias": False,
    "mamba_proj_bias": False,
    "mlp_bias": False,
    "use_bias": False,
    "use_conv_bias": True,
    "conv_kernel": 4,
    "n_groups": 1,
    "layer_norm_epsilon": 1e-5,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}

# Every Linear input width (hidden 256, mamba 8*32=256, mlp 768, attention 4*64=256) is divisible by 128.
DENSE_CONFIG = {
    **_COMMON,
    "hybrid_override_pattern": "M-M*M-M*M-",
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "mamba_num_heads": 8,
    "mamba_head_dim": 32,
    "ssm_state_size": 64,
}

# MoE layers sit between attention layers, so cache slots (M and * only) differ from layer indices.
# Linear input widths: hidden 128, mamba 4*32=128, attention 4*32=128, experts 128, shared expert 256.
MOE_CONFIG = {
    **_COMMON,
    "hybrid_override_pattern": "M*EME*E",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "mamba_num_heads": 4,
    "mamba_head_dim": 32,
    "ssm_state_size": 32,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 128,
    "n_shared_experts": 1,
    "moe_shared_expert_intermediate_size": 256,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.0,
}

VARIANTS = {"dense": ("demo", DENSE_CONFIG), "moe": ("demo_moe", MOE_CONFIG)}

# Steps sized for ~40 minutes of both trainings on 2 CPU cores (see TRAINING.md).
DEFAULT_STEPS = {"dense": 450, "moe": 500}


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------- tokenizer

def tokenizer_sample(files: list[CorpusFile], chars_per_file: int = 300_000) -> list[str]:
    """A bounded, deterministic sample of the train split: evenly spaced lines, ~chars_per_file per file."""
    texts = []
    for f in files:
        lines = f.train.splitlines(keepends=True)
        stride = max(1, len(f.train) // chars_per_file)
        texts.append("".join(lines[::stride]))
    return texts


def build_tokenizer(files: list[CorpusFile], vocab_size: int = VOCAB_SIZE):
    turns = build_turns({f.name: f.train for f in files})
    sample = tokenizer_sample(files) + [render_turn(t) for t in turns[:: max(1, len(turns) // 2000)]]
    return train_bpe(sample, vocab_size)


# ----------------------------------------------------------------------------------------------- data

@dataclass
class TrainData:
    plain: list[np.ndarray]  # token ids of each corpus file's train split
    plain_weights: np.ndarray  # sampling probability of each file
    chat: list[list[np.ndarray]] = field(default_factory=list)  # per source: token ids of each rendered turn
    chat_weights: np.ndarray | None = None
    names: list[str] = field(default_factory=list)

    def num_plain_tokens(self) -> int:
        return int(sum(len(p) for p in self.plain))


def encode(tok, text: str) -> np.ndarray:
    return np.asarray(tok.encode(text).ids, dtype=np.int32)


def build_data(tok, files: list[CorpusFile], with_chat: bool = True) -> TrainData:
    plain = [encode(tok, f.train) for f in files]
    sizes = np.array([len(p) for p in plain], dtype=np.float64)
    weights = np.sqrt(sizes) / np.sqrt(sizes).sum()
    data = TrainData(plain, weights, names=[f.name for f in files])
    if with_chat:
        texts = {f.name: f.train for f in files}
        from mixq.demo.chatdata import devils_turns, japanese_turns, kjv_turns

        sources, w = [], []
        for name, fn, weight in [("en_devils_dictionary", devils_turns, 0.5), ("en_kjv", kjv_turns, 0.25),
                                 ("ja_wagahai", japanese_turns, 0.25)]:
            if name in texts:
                turns = fn(texts[name])
                if turns:
                    enc = tok.encode_batch([render_turn(t) for t in turns])
                    sources.append([np.asarray(e.ids, dtype=np.int32) for e in enc])
                    w.append(weight)
        data.chat = sources
        data.chat_weights = np.asarray(w) / sum(w) if w else None
    return data


def make_batch(rng: np.random.Generator, data: TrainData, batch: int, seq_len: int, chat_frac: float) -> np.ndarray:
    """(batch, seq_len + 1) token ids: plain windows, or packed chat turns (each starts at a turn boundary)."""
    rows = np.empty((batch, seq_len + 1), dtype=np.int32)
    for b in range(batch):
        if data.chat and rng.random() < chat_frac:
            parts, n = [], 0
            while n < seq_len + 1:
                src = data.chat[rng.choice(len(data.chat), p=data.chat_weights)]
                t = src[rng.integers(len(src))]
                parts.append(t)
                n += len(t)
            rows[b] = np.concatenate(parts)[: seq_len + 1]
        else:
            toks = data.plain[rng.choice(len(data.plain), p=data.plain_weights)]
            start = rng.integers(0, len(toks) - seq_len - 1)
            rows[b] = toks[start: start + seq_len + 1]
    return rows


# ----------------------------------------------------------------------------------------------- model

def full_config(config: dict, tok) -> dict:
    cfg = dict(config)
    cfg["vocab_size"] = tok.get_vocab_size()
    cfg["num_hidden_layers"] = len(cfg["hybrid_override_pattern"])
    cfg["bos_token_id"] = tok.token_to_id(BOS)
    cfg["eos_token_id"] = tok.token_to_id(IM_END)
    cfg["pad_token_id"] = tok.token_to_id(PAD)
    return cfg


def init_model(config: dict, seed: int) -> Model:
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config))
    # The router weight starts at zero in mlx-lm; give it a small random init so experts specialise.
    for layer in model.layers:
        if layer.block_type == "E":
            g = layer.mixer.gate
            g.weight = 0.02 * mx.random.normal(g.weight.shape)
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return model


def count_params(model: nn.Module) -> int:
    return int(sum(v.size for _, v in tree_flatten(model.parameters())))


def loss_fn(model, x, y):
    logits = model(x)
    return nn.losses.cross_entropy(logits.astype(mx.float32), y, reduction="mean")


def train(
    config: dict,
    data: TrainData,
    steps: int,
    batch: int = 16,
    seq_len: int = 256,
    lr: float = 3e-3,
    warmup: int = 30,
    seed: int = 0,
    chat_frac: float = 0.4,
    log_every: int = 25,
    weight_decay: float = 0.01,
    verbose: bool = True,
):
    """Train from scratch. Returns (model, curve) where curve is [(step, mean loss over the last window)]."""
    model = init_model(config, seed)
    rng = np.random.default_rng(seed)
    warmup = min(warmup, max(1, steps // 10))
    schedule = optim.join_schedules(
        [optim.linear_schedule(lr / 100, lr, warmup), optim.cosine_decay(lr, max(1, steps - warmup), lr / 20)],
        [warmup],
    )
    opt = optim.AdamW(learning_rate=schedule, betas=[0.9, 0.95], weight_decay=weight_decay)
    value_and_grad = nn.value_and_grad(model, loss_fn)

    def step(x, y):
        loss, grads = value_and_grad(model, x, y)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(model, grads)
        return loss

    curve, window, losses = [], [], []
    t0 = time.time()
    for it in range(1, steps + 1):
        rows = mx.array(make_batch(rng, data, batch, seq_len, chat_frac))
        loss = step(rows[:, :-1], rows[:, 1:])
        mx.eval(loss, model.parameters(), opt.state)
        lv = float(loss.item())
        window.append(lv)
        losses.append(lv)
        if it % log_every == 0 or it == steps:
            mean = sum(window) / len(window)
            curve.append((it, round(mean, 4)))
            window = []
            if verbose:
                log(f"step {it:5d}  loss {mean:.4f}  lr {float(schedule(mx.array(it))):.2e}  "
                    f"{time.time() - t0:7.1f}s")
    return model, curve, losses


# ----------------------------------------------------------------------------------------------- evaluation

def heldout_windows(tok, files: list[CorpusFile], seq_len: int = 256) -> dict[str, np.ndarray]:
    """Non-overlapping (n, seq_len + 1) windows of each file's held-out tokens (sliding by seq_len)."""
    out = {}
    for f in files:
        t = encode(tok, f.heldout)
        n = (len(t) - 1) // seq_len
        if n > 0:
            out[f.name] = np.stack([t[i * seq_len: i * seq_len + seq_len + 1] for i in range(n)])
    return out


def nll_sum(model, windows: np.ndarray, batch: int = 16) -> tuple[float, int]:
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        w = mx.array(windows[i: i + batch])
        logits = model(w[:, :-1]).astype(mx.float32)
        nll = nn.losses.cross_entropy(logits, w[:, 1:], reduction="sum")
        total += float(nll.item())
        count += int(w[:, 1:].size)
    return total, count


def perplexity(model, windows: dict[str, np.ndarray]) -> dict[str, float]:
    res, tot, cnt = {}, 0.0, 0
    for name, w in windows.items():
        s, c = nll_sum(model, w)
        res[name] = math.exp(s / c)
        tot, cnt = tot + s, cnt + c
    res["all"] = math.exp(tot / cnt)
    return res


def unigram_perplexity(train_tokens: list[np.ndarray], windows: dict[str, np.ndarray], vocab: int) -> dict[str, float]:
    """Add-one-smoothed unigram fit on the train tokens, scored on the same targets as the model."""
    counts = np.ones(vocab, dtype=np.float64)
    for t in train_tokens:
        counts += np.bincount(t, minlength=vocab)[:vocab]
    logp = np.log(counts / counts.sum())
    res, tot, cnt = {}, 0.0, 0
    for name, w in windows.items():
        tgt = w[:, 1:].reshape(-1)
        s = -float(logp[tgt].sum())
        res[name] = math.exp(s / len(tgt))
        tot, cnt = tot + s, cnt + len(tgt)
    res["all"] = math.exp(tot / cnt)
    return res


# ----------------------------------------------------------------------------------------------- saving

def save_model(model: Model, config: dict, tok, out_dir: Path) -> None:
    """An mlx-lm model dir: bfloat16 weights (A_log and the router bias stay float32, as mlx-lm's cast
    predicate keeps them), config.json and the tokenizer with its chat template."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keep = model.cast_predicate
    weights = {k: (v.astype(mx.bfloat16) if keep(k) else v.astype(mx.float32))
               for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_tokenizer(tok, out_dir)


# ----------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mixq.demo.train", description=__doc__.split("\n")[0])
    p.add_argument("--corpus", default=None, help="corpus dir (default: $MIXQ_CORPUS or ../shared/corpus)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="writes OUT/demo and OUT/demo_moe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variant", choices=["dense", "moe", "both"], default="both")
    p.add_argument("--steps", type=int, default=None, help=f"steps per variant (default {DEFAULT_STEPS})")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--no-save", action="store_true", help="train and report only")
    args = p.parse_args(argv)

    t_start = time.time()
    corpus_dir = find_corpus_dir(args.corpus)
    files = load_corpus(corpus_dir)
    log(f"corpus {corpus_dir}: " + ", ".join(f"{f.name} {f.sha256[:12]}" for f in files))
    log(f"blas: {mixq.core.blas.info()['status']}")

    t = time.time()
    tok = build_tokenizer(files, args.vocab_size)
    log(f"tokenizer: vocab {tok.get_vocab_size()} ({time.time() - t:.1f}s)")
    t = time.time()
    data = build_data(tok, files)
    windows = heldout_windows(tok, files, args.seq_len)
    uni = unigram_perplexity(data.plain, windows, tok.get_vocab_size())
    log(f"data: {data.num_plain_tokens()} train tokens, chat turns {[len(c) for c in data.chat]}, "
        f"held-out windows {sum(len(w) for w in windows.values())} ({time.time() - t:.1f}s)")
    log(f"unigram held-out ppl: {uni['all']:.2f}")

    report = {
        "command": "python -m mixq.demo.train " + " ".join(sys.argv[1:] if argv is None else argv),
        "corpus": {f.name: f.sha256 for f in files},
        "seed": args.seed, "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr,
        "vocab_size": tok.get_vocab_size(), "train_tokens": data.num_plain_tokens(),
        "unigram_heldout_ppl": uni, "variants": {},
    }
    variants = ["dense", "moe"] if args.variant == "both" else [args.variant]
    for v in variants:
        dirname, base = VARIANTS[v]
        cfg = full_config(base, tok)
        steps = args.steps if args.steps is not None else DEFAULT_STEPS[v]
        log(f"== {v}: pattern {cfg['hybrid_override_pattern']}, {steps} steps x {args.batch} x {args.seq_len}")
        t = time.time()
        model, curve, _ = train(cfg, data, steps, args.batch, args.seq_len, args.lr, seed=args.seed,
                                log_every=args.log_every)
        wall = time.time() - t
        ppl = perplexity(model, windows)
        n = count_params(model)
        log(f"{v}: {n} params, {wall:.0f}s, final loss {curve[-1][1]:.4f}, held-out ppl {ppl['all']:.2f} "
            f"(unigram {uni['all']:.2f})")
        report["variants"][v] = {"dir": dirname, "params": n, "steps": steps, "wall_s": round(wall, 1),
                                 "curve": curve, "heldout_ppl_fp32": ppl, "pattern": cfg["hybrid_override_pattern"]}
        if not args.no_save:
            out = Path(args.out) / dirname
            save_model(model, cfg, tok, out)
            log(f"saved {out}")
    report["total_wall_s"] = round(time.time() - t_start, 1)
    if not args.no_save:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "train_log.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    log(f"total {report['total_wall_s']}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
