"""The generation engine: one thread owns the model; requests come and go through thread-safe hand-offs.

Scheduling: when every cache slot of the model can be merged into a batch (attention KV caches and Mamba
state both can in mlx-lm), sequences are decoded together with continuous batching (mlx-lm's
BatchGenerator: prompts join and leave between steps). Otherwise the engine falls back to a fair
round-robin: each active sequence gets one token (or one prefill chunk) per turn. Either way at most
`max_concurrency` sequences are active; the rest wait first-come first-served in a bounded queue.

A prefix cache (mlx-lm's LRUPromptCache) keeps the caches of finished prompts and of the conversation
history before the current turn, so a multi-turn chat only pre-fills what is new. A cancelled request
(the client went away) leaves the batch at the next step. Echo-with-logprobs requests score their prompt
in chunks on the same thread before they join generation.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from typing import Any, Callable, Optional

import mlx.core as mx

from mixq.core.errors import MixqError
from mixq.serve.sequence import (GenRequest, Output, Sequence, TokenText, make_processors, make_sampler,
                                 token_infos)

log = logging.getLogger("mixq.serve")
MIN_REUSE = 8  # prefix-cache hits shorter than this are pre-filled instead


class EngineError(Exception):
    """The engine cannot take this request now (queue full, engine stopped)."""

    def __init__(self, message: str, status: int = 503):
        super().__init__(message)
        self.status = status


class Ticket:
    """The submitter's handle on a request: cancel() frees its slot at the engine's next step."""

    def __init__(self, engine: "Engine", seq: Sequence):
        self._engine, self._seq = engine, seq

    def cancel(self) -> None:
        if not self._seq.done:
            self._seq.cancelled = True
            self._engine._wake()


def make_cache_factory(lm, kv_config=None, quantize_after: int = 0) -> Callable[[], list]:
    """Per-request cache lists. Without a kv-config: the model's own (mlx-lm's make_prompt_cache). With one:
    mixq.kvcache.make_cache (mixed-precision KV), checked against the model once, here."""
    model = getattr(lm, "model", lm)
    if kv_config is None:
        from mlx_lm.models.cache import make_prompt_cache

        return lambda: make_prompt_cache(model)
    try:
        import mixq.kvcache as kv

        make_cache = kv.make_cache
    except (ImportError, AttributeError) as e:  # the kv-cache runtime is not part of this build
        raise MixqError(f"--kv-config needs mixq.kvcache.make_cache, which this build lacks ({e})") from e
    config = kv.load_config(kv_config) if hasattr(kv, "load_config") else kv_config
    make_cache(lm, kv_config=config, quantize_after=quantize_after)  # refuses a config made for another model
    return lambda: make_cache(model, kv_config=config, quantize_after=quantize_after)


class _Solo:
    """Round-robin stepper for one sequence: prefill in chunks, then one token per turn."""

    def __init__(self, engine: "Engine", seq: Sequence, cache: list, todo: list, fed: list):
        self.e, self.seq, self.cache = engine, seq, cache
        self.todo, self.fed = list(todo), list(fed)
        self.next_input: Optional[int] = None
        self.sampler = make_sampler(seq.req.params)
        self.procs = make_processors(seq.req, engine.vocab_size)
        self.context = list(seq.req.prompt)

    def step(self) -> None:
        e, seq = self.e, self.seq
        if self.next_input is None:
            if len(self.todo) > 1:
                n = min(e.prefill_step, len(self.todo) - 1)
                if len(self.fed) < seq.req.checkpoint:
                    n = min(n, seq.req.checkpoint - len(self.fed))
                e.model(mx.array(self.todo[:n])[None], cache=self.cache)
                mx.eval([c.state for c in self.cache])
                self.fed += self.todo[:n]
                self.todo = self.todo[n:]
                if len(self.fed) == seq.req.checkpoint:
                    e._remember(self.fed, self.cache, copy=True)
                return
            x, self.todo = self.todo, []
        else:
            x = [self.next_input]
        logits = e.model(mx.array(x)[None], cache=self.cache)[:, -1, :]
        self.fed += x
        if self.procs:
            ctx = mx.array(self.context)
            for p in self.procs:
                logits = p(ctx, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        tok = self.sampler(logprobs)
        mx.eval(tok, logprobs)
        token = int(tok.item())
        self.next_input = token
        self.context.append(token)
        seq.feed(token, logprobs[0])


class _Scoring:
    """Echo with logprobs: the log-probability of every prompt token, a chunk per engine turn."""

    def __init__(self, engine: "Engine", seq: Sequence, chunk: int = 256):
        self.e, self.seq, self.chunk = engine, seq, chunk
        self.cache = engine.make_cache()
        self.pos = 0
        self.infos: list = [None]
        self.k = max(1, seq.req.params.top_logprobs)

    def step(self) -> bool:
        """One chunk; True when the whole prompt (but its last token) is in the cache."""
        prompt = self.seq.req.prompt
        end = min(self.pos + self.chunk, len(prompt) - 1)
        if end > self.pos:
            logits = self.e.model(mx.array(prompt[self.pos:end])[None], cache=self.cache)[0]
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            self.infos += token_infos(logprobs, prompt[self.pos + 1:end + 1], self.k, self.e.token_text)
            self.pos = end
        return self.pos >= len(prompt) - 1


class Engine:
    """Owns the model on one thread. submit() from anywhere; outputs go to each request's sink (called on
    the engine thread, so it must only hand them over)."""

    def __init__(self, model, tokenizer, *, max_concurrency: int = 8, max_queue: int = 256,
                 prefix_cache_size: int = 16, prefix_cache_bytes: int = 2 << 30, prefill_step: int = 512,
                 cache_factory: Optional[Callable[[], list]] = None, batched: Optional[bool] = None):
        from mlx_lm.models.cache import LRUPromptCache

        self.model, self.tokenizer = model, tokenizer
        self.max_concurrency, self.max_queue, self.prefill_step = max(1, max_concurrency), max_queue, prefill_step
        self.make_cache = cache_factory or make_cache_factory(model)
        # weights may still be lazy (the float32 cast): evaluate them here, on this thread's stream, since
        # mlx streams are per thread and the engine thread cannot run work queued on this one
        mx.eval(model.parameters())
        probe = self.make_cache()
        mergeable = all(hasattr(c, "merge") for c in probe)
        self.batched = mergeable if batched is None else (batched and mergeable)
        # mlx-lm 0.32's nemotron_h does not pass the row lengths to its SSM in a right-padded joint prefill,
        # so a shorter prompt's Mamba state comes out wrong: prompts with state-space slots pre-fill one at a
        # time (they still decode together; a lone prompt needs no padding)
        self.prefill_batch = 1 if any(type(c).__name__ == "ArraysCache" for c in probe) else 8
        self.vocab_size = _vocab_size(model, tokenizer)
        self.token_text = TokenText(tokenizer)
        self.prefix = LRUPromptCache(prefix_cache_size, prefix_cache_bytes) if prefix_cache_size > 0 else None
        self.stats = {"requests": 0, "prefix_hits": 0, "prefix_tokens": 0, "cancelled": 0, "errors": 0}
        self._intake: deque = deque()
        self._waiting: deque = deque()
        self._active: dict[int, Any] = {}  # id(seq) -> (seq, stepper or uid)
        self._scoring: list[_Scoring] = []
        self._cv = threading.Condition()
        self._stopping = False
        self._dead: Optional[str] = None
        self._bg = None
        self._uids: dict[int, Sequence] = {}
        self._thread = threading.Thread(target=self._run, name="mixq-engine", daemon=True)

    # ------------------------------------------------------------ public, any thread

    def start(self) -> "Engine":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._dead is None and not self._stopping

    def load(self) -> dict:
        return {"active": len(self._active) + len(self._scoring), "waiting": len(self._waiting) + len(self._intake),
                "batched": self.batched, "max_concurrency": self.max_concurrency, **self.stats}

    def submit(self, req: GenRequest, sink: Callable[[Output], Any]) -> Ticket:
        if not self.alive:
            raise EngineError(f"the engine is not running{': ' + self._dead if self._dead else ''}", 503)
        seq = Sequence(req, self.tokenizer, sink, self.token_text)
        with self._cv:
            if len(self._waiting) + len(self._intake) >= self.max_queue:
                raise EngineError(f"server busy: {self.max_queue} requests already waiting", 429)
            self._intake.append(seq)
            self._cv.notify_all()
        return Ticket(self, seq)

    def generate(self, req: GenRequest, timeout: float = 60.0) -> list[Output]:
        """Blocking convenience (tests, scripts): every Output of one request."""
        q: queue.SimpleQueue = queue.SimpleQueue()
        ticket = self.submit(req, q.put)
        outs, deadline = [], time.monotonic() + timeout
        while True:
            try:
                out = q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                ticket.cancel()
                raise TimeoutError("generation did not finish in time") from None
            outs.append(out)
            if out.finish_reason or out.error:
                return outs

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    # ------------------------------------------------------------ engine thread

    def _run(self) -> None:
        try:
            stream = mx.default_stream(mx.default_device())
            with mx.stream(stream):
                if self.batched:
                    self._bg = self._new_batch_generator(stream)
                while True:
                    with self._cv:
                        if self._stopping:
                            break
                        if not (self._intake or self._active or self._scoring or self._waiting):
                            self._cv.wait(0.5)
                        while self._intake:
                            self._waiting.append(self._intake.popleft())
                    try:
                        self._tick(stream)
                    except Exception as ex:  # keep serving: fail what was running, start a clean batch
                        log.exception("engine step failed")
                        self.stats["errors"] += 1
                        self._fail_all(f"generation failed: {type(ex).__name__}: {ex}")
                        if self.batched:
                            self._bg = self._new_batch_generator(stream)
        except BaseException as ex:  # pragma: no cover - only for fatal errors
            self._dead = f"{type(ex).__name__}: {ex}"
            log.exception("engine thread died")
        finally:
            self._fail_all("the server is shutting down" if self._dead is None else self._dead, waiting=True)
            # mlx 0.32 aborts the process at exit ("terminate called without an active exception") when a
            # thread that ran work leaves its streams behind: finish the work and destroy them here
            if self._bg is not None:
                self._bg.close()
            self._bg = None
            mx.synchronize()
            mx.clear_streams()

    def _new_batch_generator(self, stream):
        from mlx_lm.generate import BatchGenerator

        eos = [[t] for t in self.tokenizer.eos_token_ids]
        return BatchGenerator(self.model, stop_tokens=eos, completion_batch_size=self.max_concurrency,
                              prefill_batch_size=min(self.prefill_batch, self.max_concurrency),
                              prefill_step_size=self.prefill_step, stream=stream)

    def _fail_all(self, message: str, waiting: bool = False) -> None:
        for seq, _ in list(self._active.values()):
            seq.fail(message)
        for job in self._scoring:
            job.seq.fail(message)
        self._active.clear()
        self._scoring.clear()
        self._uids.clear()
        if waiting:
            with self._cv:
                pending = list(self._waiting) + list(self._intake)
                self._waiting.clear()
                self._intake.clear()
            for seq in pending:
                seq.fail(message)

    def _tick(self, stream) -> None:
        self._reap()
        self._admit()
        if self._scoring:
            job = self._scoring[0]
            if job.seq.cancelled:
                self._scoring.pop(0)
            elif job.step():
                self._scoring.pop(0)
                seq = job.seq
                if seq.req.params.max_tokens <= 0:
                    seq.emit(Output(prompt_tokens=job.infos, finish_reason="length"))
                else:
                    seq.emit(Output(prompt_tokens=job.infos))
                    self._start(seq, job.cache, [seq.req.prompt[-1]], seq.req.prompt[:-1])
        if self.batched:
            self._step_batch()
        else:
            for seq, solo in list(self._active.values()):
                if not seq.done and not seq.cancelled:
                    solo.step()
                if seq.done:
                    self._finish(seq)

    def _reap(self) -> None:
        """Drop cancelled requests wherever they are: waiting, scoring or generating."""
        if any(s.cancelled for s in self._waiting):
            self.stats["cancelled"] += sum(s.cancelled for s in self._waiting)
            with self._cv:
                self._waiting = deque(s for s in self._waiting if not s.cancelled)
        for key, (seq, _) in list(self._active.items()):
            if seq.cancelled and not seq.done:
                self.stats["cancelled"] += 1
                seq.done = True
                self._finish(seq, keep_cache=False)

    def _admit(self) -> None:
        while self._waiting and len(self._active) + len(self._scoring) < self.max_concurrency:
            with self._cv:
                seq = self._waiting.popleft()
            self.stats["requests"] += 1
            req = seq.req
            if req.prompt_logprobs:
                self._scoring.append(_Scoring(self, seq))
                continue
            if req.params.max_tokens <= 0:
                seq.finish_now("length")
                continue
            cache, done = self._lookup(req.prompt)
            seq.cached = len(done)
            self._start(seq, cache, req.prompt[len(done):], done)

    def _lookup(self, prompt: list) -> tuple[list, list]:
        """(cache, tokens it covers): the longest cached prefix of prompt[:-1], or a fresh cache."""
        if self.prefix is not None and len(prompt) > 1:
            cache, rest = self.prefix.fetch_nearest_cache("model", prompt[:-1])
            n = len(prompt) - 1 - len(rest)
            if cache is not None and n >= MIN_REUSE:  # copying a cache to save a few tokens is no saving
                self.stats["prefix_hits"] += 1
                self.stats["prefix_tokens"] += n
                return cache, prompt[:n]
        return self.make_cache(), []

    def _remember(self, tokens: list, cache: list, copy: bool = False) -> None:
        if self.prefix is None or not tokens:
            return
        if copy:
            import copy as _copy

            cache = _copy.deepcopy(cache)
        self.prefix.insert_cache("model", list(tokens), cache)

    def _start(self, seq: Sequence, cache: list, todo: list, fed: list) -> None:
        """Put a sequence into generation with its cache (covering `fed`) and the prompt tokens still to run."""
        if self.batched:
            segments = [todo]
            cut = seq.req.checkpoint - len(fed)
            if 0 < cut < len(todo) - 1:
                segments = [todo[:cut], todo[cut:]]
            procs = make_processors(seq.req, self.vocab_size)
            (uid,) = self._bg.insert_segments([segments], max_tokens=[seq.req.params.max_tokens], caches=[cache],
                                              all_tokens=[list(fed)], samplers=[make_sampler(seq.req.params)],
                                              logits_processors=[procs])
            seq.uid = uid
            self._uids[uid] = seq
            self._active[id(seq)] = (seq, uid)
        else:
            self._active[id(seq)] = (seq, _Solo(self, seq, cache, todo, fed))

    def _step_batch(self) -> None:
        if not self._uids:
            return
        prompt_resps, gen_resps = self._bg.next()
        marks = [r.uid for r in prompt_resps if r.end_of_segment and not r.end_of_prompt and r.uid in self._uids]
        if marks and self.prefix is not None:
            for uid, (cache, tokens) in self._bg.extract_cache(marks).items():
                self._remember(tokens, cache)
        for r in gen_resps:
            seq = self._uids.get(r.uid)
            if seq is None or seq.done:
                continue
            seq.feed(r.token, r.logprobs, r.finish_reason)
            if r.finish_reason is not None:
                self._uids.pop(r.uid, None)
                self._active.pop(id(seq), None)
                if r.prompt_cache is not None and not seq.cancelled:
                    self._remember(r.all_tokens, r.prompt_cache)
            elif seq.done:
                self._finish(seq)

    def _finish(self, seq: Sequence, keep_cache: bool = True) -> None:
        entry = self._active.pop(id(seq), None)
        if entry is None:
            return
        if self.batched:
            uid = entry[1]
            self._uids.pop(uid, None)
            caches = self._bg.remove([uid], return_prompt_caches=keep_cache and self.prefix is not None)
            if keep_cache and uid in caches:
                cache, tokens = caches[uid]
                self._remember(tokens, cache)
        elif keep_cache:
            self._remember(entry[1].fed, entry[1].cache)


def _vocab_size(model, tokenizer) -> int:
    args = getattr(model, "args", None)
    v = getattr(args, "vocab_size", None)
    return int(v) if v else len(tokenizer)
