"""The local backend: one loaded model answering what tasks ask: generate (greedy) from a chat, a plain
prompt or token ids, and raw logits over token windows (lm-eval's scoring, mixq.eval.lmeval.model, and KL).

Greedy and deterministic. Generation is batched where that cannot change a result: mlx-lm's batch
generator left-pads prompts, which attention layers mask but Mamba / conv state does not (measured: the
fixture hybrids' log-probs move by ~0.07 under padding), so models with any non-attention cache batch
only prompts of equal length; pure-attention models batch everything. With a kv config (mixq.kvcache)
each sequence runs alone through its own mixed-precision cache. Logits batches are right-padded, which
a causal model never sees.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixq.core.errors import MixqError
from mixq.eval.textproc import THINK_CLOSE, THINK_OPEN, split_reasoning

MAX_BATCH_TOKENS = 8192
LOGITS_BYTES = 1 << 30  # float32 logits per forward batch: tokens x vocab x 4 stays under this


@dataclass
class GenRequest:
    messages: list[dict] | None = None   # rendered with the chat template (plain transcript without one)
    prompt: str | None = None            # raw text, no template (BOS added)
    ids: list[int] | None = None         # token ids as they are (lm-eval's prompts: already encoded)
    tools: list[dict] | None = None      # OpenAI-style tools, given to the chat template
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)


@dataclass
class GenResult:
    text: str          # everything generated (reasoning included), cut at a stop string
    reasoning: str
    answer: str        # what is scored: the text with reasoning removed
    tokens: int
    finish: str        # "stop" | "length"
    tool_calls: list[dict] | None = None  # set by backends that parse tool calls themselves (servers)


def size_on_disk(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("model*.safetensors"))


def thinking_opened(prompt_text: str) -> bool:
    tail = prompt_text.rstrip()
    return tail.rfind(THINK_OPEN) > tail.rfind(THINK_CLOSE)


def plain_transcript(messages: list[dict]) -> str:
    lines = [f"{m['role']}: {m.get('content') or ''}" for m in messages]
    return "\n\n".join(lines) + "\n\nassistant:"


class LocalBackend:
    kind = "local"

    def __init__(self, lm, *, no_think: bool = False, kv_config: Any = None, chat: bool = True):
        self.lm, self.model, self.tok = lm, lm.model, lm.tokenizer
        self.no_think, self.kv_config = no_think, kv_config
        self.chat = chat and bool(getattr(self.tok, "has_chat_template", False))
        self._fingerprint: str | None = None
        # documents longer than model_max_length are windowed here, so transformers' one-time "sequence
        # longer than the maximum" warning is noise: mark it as already given
        hf = getattr(self.tok, "_tokenizer", None)
        if isinstance(getattr(hf, "deprecation_warnings", None), dict):
            hf.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
        if kv_config is not None:
            self._make_cache()  # a config for another model fails now, with its own message

    # ------------------------------------------------------------------------------------------ identity
    def identity(self) -> dict:
        from mixq.core.modelio import fingerprint

        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.lm.path)
        return {"name": self.lm.name, "path": str(self.lm.path), "fingerprint": self._fingerprint,
                "size_bytes": size_on_disk(self.lm.path), "kind": self.kind,
                "chat_template": self.chat, "kv_config": self.kv_config is not None}

    def settings(self) -> dict:
        """Backend options that change generated text (part of every cache key)."""
        import hashlib
        import json

        kv = None
        if self.kv_config is not None:
            from mixq.kvcache import load_config

            kv = hashlib.sha256(json.dumps(load_config(self.kv_config), sort_keys=True).encode()).hexdigest()[:16]
        template = getattr(self.tok, "chat_template", None) if self.chat else None
        tpl = hashlib.sha256(str(template).encode()).hexdigest()[:16] if template else None
        return {"no_think": self.no_think, "chat": self.chat, "kv_config": kv, "chat_template": tpl}

    # ------------------------------------------------------------------------------------------ tokens
    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def bos(self) -> list[int]:
        if getattr(self.tok, "bos_token", None) is None or getattr(self.tok, "bos_token_id", None) is None:
            return []
        return [int(self.tok.bos_token_id)]

    def vocab_probe(self) -> list[int]:
        return self.encode("The quick brown fox, 吾輩は猫である。 def f(x): return x**2\n")

    def render(self, req: GenRequest) -> tuple[str, list[int], bool]:
        """(prompt text, token ids, whether the prompt opened a reasoning block)."""
        if req.ids is not None:
            text = self.tok.decode(req.ids)
            return text, list(req.ids), thinking_opened(text)
        if req.prompt is not None:
            return req.prompt, self.bos() + self.encode(req.prompt), False
        if not self.chat:
            text = plain_transcript(req.messages or [])
            return text, self.bos() + self.encode(text), False
        kwargs: dict[str, Any] = {"add_generation_prompt": True, "tokenize": False}
        if req.tools:
            kwargs["tools"] = req.tools
        if self.no_think:
            kwargs["enable_thinking"] = False
        try:
            text = self.tok.apply_chat_template(req.messages, **kwargs)
        except Exception as e:  # jinja errors from the model's own template
            raise MixqError(f"the chat template cannot render an eval prompt: {str(e).splitlines()[0]}") from e
        return text, self.encode(text), thinking_opened(text)

    # ------------------------------------------------------------------------------------------ forward
    def _make_cache(self):
        try:
            from mixq.kvcache import make_cache
        except ImportError as e:  # pragma: no cover - the package ships with kvcache
            raise MixqError("--kv-config needs mixq.kvcache") from e
        return make_cache(self.lm, self.kv_config)

    def logits(self, rows: list[list[int]]):
        """float32 logits (B, max len, V) for right-padded rows (padding positions are meaningless)."""
        import mlx.core as mx

        if self.kv_config is not None:
            outs = [self.model(mx.array(r, dtype=mx.int32)[None], cache=self._make_cache()).astype(mx.float32)
                    for r in rows]
            n = max(len(r) for r in rows)
            outs = [mx.pad(o, [(0, 0), (0, n - o.shape[1]), (0, 0)]) if o.shape[1] < n else o for o in outs]
            out = mx.concatenate(outs, axis=0)
        else:
            n = max(len(r) for r in rows)
            x = mx.array([r + [0] * (n - len(r)) for r in rows], dtype=mx.int32)
            out = self.model(x).astype(mx.float32)
        mx.eval(out)
        return out

    def vocab_size(self) -> int:
        cfg = self.lm.config or {}
        v = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
        return int(v) if v else 32768

    def batches(self, rows: list[list[int]], max_tokens: int | None = None):
        """Index groups of rows whose padded size stays under max_tokens (longest first, less padding);
        by default as many tokens as keep the batch's float32 logits under LOGITS_BYTES."""
        if max_tokens is None:
            max_tokens = max(1, min(MAX_BATCH_TOKENS, LOGITS_BYTES // (4 * self.vocab_size())))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        group: list[int] = []
        for i in order:
            if group and (len(group) + 1) * len(rows[group[0]]) > max_tokens:
                yield group
                group = []
            group.append(i)
        if group:
            yield group

    # ------------------------------------------------------------------------------------------ generate
    def _pure_attention(self) -> bool:
        from mlx_lm.models.cache import KVCache

        from mixq.core.anatomy import make_cache

        return all(type(c) is KVCache for c in make_cache(self.model))

    def generate(self, reqs: list[GenRequest]) -> list[GenResult]:
        rendered = [self.render(r) for r in reqs]
        order = list(range(len(reqs)))
        if self.kv_config is not None:
            groups = [[i] for i in order]
        elif self._pure_attention():
            groups = [order]
        else:
            by_len: dict[int, list[int]] = {}
            for i in order:
                by_len.setdefault(len(rendered[i][1]), []).append(i)
            groups = list(by_len.values())
        out: list[GenResult | None] = [None] * len(reqs)
        for g in groups:
            if self.kv_config is not None:
                toks = [self._generate_one(rendered[g[0]][1], reqs[g[0]])]
            else:
                toks = self._generate_batch([rendered[i][1] for i in g], [reqs[i] for i in g])
            for i, (ids, finish) in zip(g, toks):
                out[i] = self._result(ids, finish, reqs[i], rendered[i][2])
        return out  # type: ignore[return-value]

    def _cut(self, text: str, stops: list[str]) -> tuple[str, bool]:
        hits = [text.find(s) for s in stops if s and s in text]
        return (text[: min(hits)], True) if hits else (text, False)

    def _result(self, ids: list[int], finish: str, req: GenRequest, opened: bool) -> GenResult:
        text, stopped = self._cut(self.tok.decode(ids), req.stop)
        reasoning, answer = split_reasoning(text, opened)
        return GenResult(text=text, reasoning=reasoning, answer=answer, tokens=len(ids),
                         finish="stop" if stopped or finish == "stop" else "length")

    def _stopped(self, ids: list[int], req: GenRequest) -> bool:
        return bool(req.stop) and self._cut(self.tok.decode(ids), req.stop)[1]

    def _generate_batch(self, prompts: list[list[int]], reqs: list[GenRequest]) -> list[tuple[list[int], str]]:
        from mlx_lm.generate import BatchGenerator

        gen = BatchGenerator(self.model, stop_tokens=[[t] for t in self.tok.eos_token_ids],
                             completion_batch_size=max(1, len(prompts)), prefill_batch_size=max(1, len(prompts)))
        try:
            uids = gen.insert(prompts, [max(1, r.max_tokens) for r in reqs])
            req_of = dict(zip(uids, reqs))
            toks: dict[int, list[int]] = {u: [] for u in uids}
            finish: dict[int, str] = {}
            while responses := gen.next_generated():
                done = []
                for r in responses:
                    if r.uid in finish:
                        continue
                    if r.finish_reason != "stop":
                        toks[r.uid].append(int(r.token))
                    if r.finish_reason is not None:
                        finish[r.uid] = "stop" if r.finish_reason == "stop" else "length"
                    elif self._stopped(toks[r.uid], req_of[r.uid]):
                        finish[r.uid] = "stop"
                        done.append(r.uid)
                if done:
                    gen.remove(done)
                if len(finish) == len(uids):
                    break
        finally:
            gen.close()
        return [(toks[u], finish.get(u, "length")) for u in uids]

    def _generate_one(self, prompt: list[int], req: GenRequest) -> tuple[list[int], str]:
        import mlx.core as mx
        from mlx_lm.generate import generate_step

        eos = set(self.tok.eos_token_ids)
        ids: list[int] = []
        steps = generate_step(mx.array(prompt, dtype=mx.int32), self.model, max_tokens=max(1, req.max_tokens),
                              prompt_cache=self._make_cache())
        for tok, _ in steps:
            t = int(tok)
            if t in eos:
                return ids, "stop"
            ids.append(t)
            if self._stopped(ids, req):
                return ids, "stop"
        return ids, "length"
