"""mixq's local backend as an lm-evaluation-harness model: `--model mixq --model_args pretrained=DIR[,kv_config=F]`.

Importing this module registers the model with lm-eval (after lm-eval's own models, so lm-eval's registry
stays complete). The scoring follows lm-eval's HF model exactly where it defines results:

* `loglikelihood`: lm-eval's context / continuation split (TemplateLM), the sequence left-truncated to
  `max_length + 1` tokens, the continuation's summed log-probability and whether greedy decoding gives it;
* `loglikelihood_rolling`: lm-eval's disjoint rolling windows of `max_length` tokens, the first one
  conditioned on the prefix token (BOS, else EOS), every token scored once;
* `generate_until`: greedy, the prompt encoded without special tokens and left-truncated to leave room for
  `max_gen_toks`, the text cut at the first stop string; reasoning (a `<think>` block the chat template
  opened or the model wrote) is removed before the task sees the answer.

Forwards run through mixq.eval.backend.LocalBackend (float32 logits, batched by length; with a kv config,
one sequence at a time through mixq's mixed-precision KV cache). Each result is handed to lm-eval's
request cache as it is computed (`--use_cache` resumes an interrupted run).
"""

from __future__ import annotations

from typing import Any

import lm_eval.models  # noqa: F401  (registers lm-eval's own models before ours)
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from mixq.core.errors import MixqError
from mixq.eval.backend import GenRequest, LocalBackend
from mixq.eval.textproc import answer_text

GEN_CHUNK = 16            # generate_until requests per backend call (a cache point after each)
IGNORED_ARGS = {"batch_size", "max_batch_size", "device", "trust_remote_code", "dtype", "parallelize"}


@register_model("mixq")
class MixqLM(TemplateLM):
    def __init__(self, pretrained: str | None = None, kv_config: str | None = None, max_length: int | None = None,
                 no_think: bool | str = False, max_gen_toks: int = 256, backend: LocalBackend | None = None,
                 quiet: bool = False, **kwargs: Any):
        super().__init__()
        unknown = sorted(set(kwargs) - IGNORED_ARGS)
        if unknown:
            raise MixqError(f"mixq model: unknown model_args {', '.join(unknown)} (known: pretrained, kv_config, "
                            "max_length, no_think, max_gen_toks)")
        if backend is None:
            if not pretrained:
                raise MixqError("mixq model: pretrained=MODEL is required")
            from mixq.core.modelio import load

            backend = LocalBackend(load(pretrained), no_think=_flag(no_think), kv_config=kv_config, chat=True)
        self.backend = backend
        self.tokenizer = getattr(backend.tok, "_tokenizer", backend.tok)
        self._max_length = int(max_length) if max_length else self._default_max_length()
        self.max_gen_toks = int(max_gen_toks)
        self.quiet = quiet

    # -------------------------------------------------------------------------------- properties
    def _default_max_length(self) -> int:
        cfg = self.backend.lm.config or {}
        for key in ("max_position_embeddings", "n_positions", "seq_length"):
            v = cfg.get(key) or (cfg.get("text_config") or {}).get(key)
            if v:
                return int(v)
        v = getattr(self.tokenizer, "model_max_length", None)
        return int(v) if v and v < 1_000_000 else 2048

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(self.backend.lm.path).replace("/", "__")

    def get_model_info(self) -> dict:
        ident = self.backend.identity()
        return {"model_name": ident["name"], "model_path": ident["path"], "model_fingerprint": ident["fingerprint"],
                "kv_config": bool(self.backend.kv_config), "max_length": self.max_length}

    # -------------------------------------------------------------------------------- tokens
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        ids = self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.tokenizer.decode(tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": add_generation_prompt,
                                  "continue_final_message": not add_generation_prompt}
        if self.backend.no_think:
            kwargs["enable_thinking"] = False
        try:
            return self.tokenizer.apply_chat_template(chat_history, **kwargs)
        except Exception as e:  # jinja errors from the model's own template
            raise MixqError(f"the chat template cannot render a prompt: {str(e).splitlines()[0]}") from e

    # -------------------------------------------------------------------------------- scoring
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or self.quiet)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        import mlx.core as mx

        from mixq.core.metrics import log_probs

        rows: dict[tuple[int, ...], list[int]] = {}   # distinct model input -> requests reading it
        spans = []
        for i, (_, ctx, cont) in enumerate(requests):
            if not cont:
                raise MixqError("an empty continuation has no log-likelihood")
            whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
            inp = tuple(whole[:-1])
            rows.setdefault(inp, []).append(i)
            spans.append((len(inp) - len(cont), list(cont)))
        keys = list(rows)
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        for group in self.backend.batches([list(k) for k in keys]):
            lg = self.backend.logits([list(keys[g]) for g in group])
            for b, g in enumerate(group):
                for i in rows[keys[g]]:
                    start, cont = spans[i]
                    lp = log_probs(lg[b, start: start + len(cont)])
                    picked = mx.take_along_axis(lp, mx.array(cont)[:, None], axis=-1)
                    greedy = bool(mx.all(mx.argmax(lp, axis=-1) == mx.array(cont)).item())
                    out[i] = (float(picked.sum().item()), greedy)
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (string,) in [r.args for r in requests]:
            windows = [(None,) + lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            total = sum(ll for ll, _ in self._loglikelihood_tokens(windows)) if windows else 0.0
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    # -------------------------------------------------------------------------------- generation
    def _request(self, context: str, gen_kwargs: dict) -> GenRequest:
        kw = dict(gen_kwargs or {})
        if kw.get("do_sample") and float(kw.get("temperature", 1.0) or 0.0) > 0:
            raise MixqError("the mixq model decodes greedily; this task asks for sampling (do_sample)")
        until = kw.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_gen = int(kw.get("max_gen_toks", self.max_gen_toks))
        ids = self.tok_encode(context, left_truncate_len=max(1, self.max_length - max_gen))
        return GenRequest(ids=ids, max_tokens=max_gen, stop=until)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        args = [r.args for r in requests]
        out: list[str] = []
        for s in range(0, len(args), GEN_CHUNK):
            chunk = args[s:s + GEN_CHUNK]
            results = self.backend.generate([self._request(c, g) for c, g in chunk])
            for (context, gen_kwargs), res in zip(chunk, results):
                answer = answer_text(res.text, _opened(context))
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), answer)
                out.append(answer)
        return out


def _opened(context: str) -> bool:
    from mixq.eval.backend import thinking_opened

    return thinking_opened(context)


def _flag(v) -> bool:
    return v if isinstance(v, bool) else str(v).strip().lower() in ("1", "true", "yes")
