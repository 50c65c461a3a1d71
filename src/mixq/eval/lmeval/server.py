"""An OpenAI-compatible server (mixq serve, vLLM, llama.cpp...) as an lm-eval model: lm-eval's own
`local-completions` (log-likelihoods from echoed prompt log-probs, generation from /v1/completions) or,
for chat prompts without a local tokenizer, `local-chat-completions`, with two additions:

* the API key (`--api-key`) goes in the Authorization header of every request;
* reasoning is removed from generations as for a local model (a `<think>` block the rendered prompt
  opened or the model wrote); a server that splits reasoning itself already returns only the answer.

Log-likelihood tasks need the model's tokenizer (`--tokenizer`, or a local MODEL), as lm-eval's API
models do: the prompt is sent as token ids and lm-eval finds the continuation by token count.
"""

from __future__ import annotations

from lm_eval.models.openai_completions import LocalChatCompletion, LocalCompletionsAPI

from mixq.eval.backend import thinking_opened
from mixq.eval.textproc import answer_text

CONCURRENCY = 4


class _Answers:
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        outs = super().generate_until(requests, disable_tqdm=disable_tqdm)
        return [answer_text(o or "", thinking_opened(r.args[0]) if isinstance(r.args[0], str) else False)
                for r, o in zip(requests, outs)]


class ServerCompletions(_Answers, LocalCompletionsAPI):
    pass


class ServerChat(_Answers, LocalChatCompletion):
    pass


def server_lm(url: str, model: str, *, api_key: str | None, tokenizer: str | None, chat: bool,
              max_length: int | None = None, timeout: int = 600):
    base = url.rstrip("/")
    base = base if base.endswith("/v1") else base + "/v1"
    common = {"model": model, "num_concurrent": CONCURRENCY, "max_retries": 1, "timeout": timeout,
              "header": {"Authorization": f"Bearer {api_key}"} if api_key else {}}
    if chat and tokenizer is None:
        return ServerChat(base_url=base + "/chat/completions", tokenizer_backend=None, **common)
    if tokenizer is None:
        return ServerCompletions(base_url=base + "/completions", tokenizer_backend=None, **common)
    return ServerCompletions(base_url=base + "/completions", tokenizer_backend="huggingface", tokenizer=tokenizer,
                             max_length=max_length or 2048, **common)
