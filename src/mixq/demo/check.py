"""Evaluate the shipped demo models.

    python -m mixq.demo.check [--corpus DIR] [--models demo,demo-moe] [--max-windows N] [--json FILE]

Prints, for each model: held-out perplexity (float32 compute on the shipped bfloat16 weights) vs an
add-one unigram fit on the train tokens and scored on the same held-out targets; greedy chat generation from
20 prompts, counting outputs that close a `<think>` block, then give a non-empty answer, then end the turn
with `<|im_end|>` (eos); and the held-out mean KL(float || quantized) when every quantizable weight
(Linear, SwitchLinear, Embedding incl. lm_head; not conv1d, A_log, D, dt_bias, norms or the router gate) is
quantized and dequantized at 2-bit g64 vs 8-bit g64.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import mixq  # noqa: F401  (fast BLAS before mlx)
from mixq.core.corpus import find_corpus_dir, load_corpus
from mixq.core.tokenizer import THINK_CLOSE
from mixq.demo import model_path

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
from mlx_lm import load, stream_generate  # noqa: E402
from mlx_lm.models.switch_layers import SwitchLinear  # noqa: E402

THINK_PROMPTS = [
    # Devil's Dictionary words from the train split ...
    "What does the Devil's Dictionary say about Abasement?",
    "Define Accordion.",
    "What is Bore, according to Bierce?",
    "What does the Devil's Dictionary say about Cynic?",
    "Define Egotist.",
    "What does the Devil's Dictionary say about Happiness?",
    "Define Lawyer.",
    "What is Patience, according to Bierce?",
    # ... and from the held-out tail of the file (never trained on)
    "What does the Devil's Dictionary say about Wedding?",
    "Define Year.",
    "What is Zeal, according to Bierce?",
    "What does the Devil's Dictionary say about Vanity?",
    # King James Bible verse continuation
    "Continue the verse: In the beginning",
    "Continue the verse: And God said,",
    "Continue the verse: The LORD is my shepherd;",
    "Continue the verse: Blessed are the",
    # Japanese
    "次の文の続きは？「吾輩は猫である。」",
    "次の文の続きは？「主人は何も言わない。」",
    # free form
    "What is a cat?",
    "Tell me about the sea.",
]

NO_THINK_PROMPTS = [
    "What does the Devil's Dictionary say about Love?",
    "Define War.",
    "Continue the verse: And the earth was",
    "次の文の続きは？「名前はまだ無い。」",
]


def qdq(w: mx.array, bits: int, group_size: int = 64) -> mx.array:
    wq, scales, biases = mx.quantize(w.astype(mx.float32), group_size=group_size, bits=bits)
    return mx.dequantize(wq, scales, biases, group_size=group_size, bits=bits).astype(mx.float32)


def quantize_dequantize(model: nn.Module, bits: int, group_size: int = 64) -> int:
    """Round every Linear/SwitchLinear/Embedding weight in place; returns how many tensors were touched."""
    n = 0
    for _, m in model.named_modules():
        if isinstance(m, (nn.Linear, SwitchLinear, nn.Embedding)):
            m.weight = qdq(m.weight, bits, group_size)
            n += 1
    mx.eval(model.parameters())
    return n


def load_float(path):
    model, tok = load(str(path))
    model.set_dtype(mx.float32)  # CPU: compute in float32 (bf16 GatherMM is unsupported there)
    mx.eval(model.parameters())
    return model, tok


def heldout_eval(path, windows: dict[str, np.ndarray], batch: int = 16) -> dict:
    """Perplexity of the float model and mean KL(float || qdq) at 2 and 8 bits, on the same windows."""
    ref, _ = load_float(path)
    quant = {}
    for bits in (2, 8):
        m, _ = load_float(path)
        quantize_dequantize(m, bits)
        quant[bits] = m
    nll, kl, count = 0.0, {2: 0.0, 8: 0.0}, 0
    per_file = {}
    for name, w_all in windows.items():
        f_nll, f_cnt = 0.0, 0
        for i in range(0, len(w_all), batch):
            w = mx.array(w_all[i: i + batch])
            x, y = w[:, :-1], w[:, 1:]
            lp = nn.log_softmax(ref(x).astype(mx.float32), axis=-1)
            s = -mx.take_along_axis(lp, y[..., None], axis=-1).sum()
            p = mx.exp(lp)
            kls = {b: (p * (lp - nn.log_softmax(quant[b](x).astype(mx.float32), axis=-1))).sum() for b in kl}
            mx.eval(s, *kls.values())
            f_nll += float(s.item())
            f_cnt += int(y.size)
            for b in kl:
                kl[b] += float(kls[b].item())
        per_file[name] = math.exp(f_nll / f_cnt)
        nll, count = nll + f_nll, count + f_cnt
    return {"ppl": math.exp(nll / count), "ppl_per_file": per_file, "tokens": count,
            "kl_2bit_g64": kl[2] / count, "kl_8bit_g64": kl[8] / count}


def generate_one(model, tok, messages, max_tokens: int = 128) -> tuple[str, str | None]:
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    text, reason = "", None
    for r in stream_generate(model, tok, prompt=prompt, max_tokens=max_tokens):
        text += r.text
        reason = r.finish_reason
    return text, reason


def think_ok(text: str, reason: str | None) -> bool:
    """The prompt opened `<think>`: the output closes it, answers (non-empty), and stopped at eos."""
    if THINK_CLOSE not in text or reason != "stop":
        return False
    thought, answer = text.split(THINK_CLOSE, 1)
    return bool(thought.strip()) and bool(answer.strip())


def no_think_ok(text: str, reason: str | None) -> bool:
    """The prompt rendered `<think></think>`: the output is a non-empty answer ending at eos."""
    return reason == "stop" and bool(text.strip()) and THINK_CLOSE not in text


def generation_eval(path, max_tokens: int = 128, show: bool = True) -> dict:
    model, tok = load_float(path)
    rows, ok = [], 0
    for q in THINK_PROMPTS:
        text, reason = generate_one(model, tok, [{"role": "user", "content": q}], max_tokens)
        good = think_ok(text, reason)
        ok += good
        rows.append({"prompt": q, "output": text, "finish": reason, "ok": good})
        if show:
            print(f"  [{'ok' if good else '--'}] {q!r} -> {text!r} ({reason})", flush=True)
    nt_ok = 0
    for q in NO_THINK_PROMPTS:
        msgs = [{"role": "system", "content": "/no_think"}, {"role": "user", "content": q}]
        text, reason = generate_one(model, tok, msgs, max_tokens)
        good = no_think_ok(text, reason)
        nt_ok += good
        rows.append({"prompt": "/no_think " + q, "output": text, "finish": reason, "ok": good})
        if show:
            print(f"  [{'ok' if good else '--'}] /no_think {q!r} -> {text!r} ({reason})", flush=True)
    return {"think_ok": ok, "think_total": len(THINK_PROMPTS), "no_think_ok": nt_ok,
            "no_think_total": len(NO_THINK_PROMPTS), "samples": rows}


def main(argv: list[str] | None = None) -> int:
    from mixq.demo.train import encode, heldout_windows, unigram_perplexity
    from tokenizers import Tokenizer

    p = argparse.ArgumentParser(prog="python -m mixq.demo.check", description=__doc__.split("\n")[0])
    p.add_argument("--corpus", default=None)
    p.add_argument("--models", default="demo,demo-moe", help="comma-separated names or model dirs")
    p.add_argument("--max-windows", type=int, default=0, help="cap held-out windows per file (0: all)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    files = load_corpus(find_corpus_dir(args.corpus))
    print(f"blas: {mixq.core.blas.info()['status']}")
    results = {}
    for name in args.models.split(","):
        path = Path(name) if Path(name).is_dir() else model_path(name)
        t0 = time.time()
        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        windows = heldout_windows(tok, files, args.seq_len)
        if args.max_windows:
            windows = {k: v[: args.max_windows] for k, v in windows.items()}
        uni = unigram_perplexity([encode(tok, f.train) for f in files], windows, tok.get_vocab_size())
        cfg = json.loads((path / "config.json").read_text())
        print(f"== {name} ({path}) pattern {cfg['hybrid_override_pattern']}")
        ev = heldout_eval(path, windows)
        print(f"held-out ppl {ev['ppl']:.2f} vs unigram {uni['all']:.2f} on {ev['tokens']} tokens")
        for f, v in ev["ppl_per_file"].items():
            print(f"  {f:22s} ppl {v:9.2f}  unigram {uni[f]:9.2f}")
        print(f"held-out mean KL vs float: 2-bit g64 {ev['kl_2bit_g64']:.4f}  8-bit g64 {ev['kl_8bit_g64']:.6f}")
        gen = generation_eval(path, args.max_tokens)
        print(f"think block closed + answer + <|im_end|>: {gen['think_ok']}/{gen['think_total']}; "
              f"/no_think answer + <|im_end|>: {gen['no_think_ok']}/{gen['no_think_total']}")
        print(f"({time.time() - t0:.0f}s)")
        results[name] = {"unigram_ppl": uni["all"], "unigram_per_file": uni, **ev, **gen}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2, ensure_ascii=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
