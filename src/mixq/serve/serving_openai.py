"""OpenAI routes: /v1/models, /v1/chat/completions, /v1/completions (as vLLM's serving_chat / _completion)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from mixq.serve import protocol as P
from mixq.serve.errors import APIError, error_body, error_response
from mixq.serve.prompting import PromptError, encode_completion_prompt
from mixq.serve.render_openai import ChatAssembler, CompletionAssembler, sse
from mixq.serve.sequence import GenRequest
from mixq.serve.serving import Serving

MAX_PROMPTS = 256


class OpenAIStream:
    """Stream renderer: the chunks of each output, an error event if the engine fails, then `[DONE]`."""

    def __init__(self, render, first=None):
        self._render, self.first = render, first

    def start(self) -> list:
        return [sse(self.first)] if self.first is not None else []

    def render(self, out) -> list:
        return [sse(c) for c in self._render(out)]

    def error(self, message: str) -> list:
        return [sse(error_body(message, "server_error", code="generation_failed"))]

    def end(self) -> list:
        return ["data: [DONE]\n\n"]


def completion_jobs(s: Serving, req: P.CompletionRequest) -> list:
    """(GenRequest, echo text) per prompt."""
    prompts = req.prompts()
    if len(prompts) > MAX_PROMPTS:
        raise APIError(f"at most {MAX_PROMPTS} prompts per request", param="prompt")
    if req.stream and len(prompts) != 1:
        raise APIError("streaming takes one prompt per request", param="prompt")
    if req.suffix:
        raise APIError("suffix is not supported", param="suffix")
    jobs = []
    for p in prompts:
        try:
            tokens = encode_completion_prompt(s.tokenizer, p)
        except PromptError as e:
            raise APIError(str(e), param="prompt") from None
        if not tokens:
            raise APIError("the prompt is empty", param="prompt")
        if any(t < 0 or t >= s.engine.vocab_size for t in tokens):
            raise APIError(f"prompt token ids must lie in [0, {s.engine.vocab_size})", param="prompt")
        params = s.sampling(req, len(tokens), req.max_tokens, allow_zero=True, prompt_param="prompt")
        params.logprobs = req.logprobs is not None
        params.top_logprobs = int(req.logprobs or 0)
        echo_text = (p if isinstance(p, str) else s.tokenizer.decode(tokens)) if req.echo else None
        jobs.append((GenRequest(prompt=tokens, params=params, prompt_logprobs=bool(req.echo and params.logprobs)),
                     echo_text))
    return jobs


def openai_router(s: Serving) -> APIRouter:
    router = APIRouter()
    settings = s.settings

    def card(name: str) -> P.ModelCard:
        return P.ModelCard(id=name, max_model_len=settings.context_length)

    @router.get("/v1/models")
    async def models():
        return P.ModelList(data=[card(settings.model_id)]).model_dump()

    @router.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        s.check_model(model_id)
        return card(model_id).model_dump()

    @router.post("/v1/chat/completions")
    async def chat(request: Request):
        req, raw = await s.parse(request, P.ChatCompletionRequest)
        problem = req.problem(raw)
        if problem is not None:
            raise APIError(problem[1], param=problem[0])
        gen = s.chat_job(req)
        ticket, q = s.submit(gen, bool(req.stream))
        asm = ChatAssembler(settings.model_id, logprobs=gen.params.logprobs)
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return s.stream(request, ticket, q, OpenAIStream(lambda out: asm.chunks(out, usage), asm.first_chunk()))
        error = await s.collect(request, ticket, q, asm.add)
        return error_response(503, error, "server_error") if error else asm.response()

    @router.post("/v1/completions")
    async def completions(request: Request):
        req, _ = await s.parse(request, P.CompletionRequest)
        jobs = completion_jobs(s, req)
        tickets = []
        try:
            for gen, _ in jobs:
                tickets.append(s.submit(gen, bool(req.stream)))
        except APIError:  # the queue filled up part-way: withdraw the prompts already queued
            for ticket, _ in tickets:
                ticket.cancel()
            raise
        asms = [CompletionAssembler(settings.model_id, i, gen, echo_text, s.engine.token_text)
                for i, (gen, echo_text) in enumerate(jobs)]
        if req.stream:
            (ticket, q), asm = tickets[0], asms[0]
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return s.stream(request, ticket, q, OpenAIStream(lambda out: asm.chunks(out, usage)))
        try:
            for (ticket, q), asm in zip(tickets, asms):
                error = await s.collect(request, ticket, q, asm.add)
                if error:
                    return error_response(503, error, "server_error")
        finally:
            for ticket, _ in tickets:
                ticket.cancel()
        return CompletionAssembler.merge(asms)

    return router


__all__ = ["openai_router", "OpenAIStream", "completion_jobs"]
