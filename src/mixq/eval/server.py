"""The server backend: evaluate any OpenAI-compatible server (mixq serve, vLLM, llama.cpp, ...) instead
of a local model (`mixq eval NAME --server URL`).

* generation: POST /v1/chat/completions (temperature 0, the task's tools, `chat_template_kwargs:
  {"enable_thinking": false}` with --no-think); the reply's `reasoning_content` (or `reasoning`) and
  `tool_calls` are used when the server splits them, otherwise reasoning is stripped from the content
  as for a local model. Plain prompts go to POST /v1/completions.
* lm-eval's tasks reach servers through lm-eval's own API models (mixq.eval.lmeval.server); this backend
  serves mixq's own generation tasks (bfcl). `kl` is refused: it needs full next-token distributions.
* `--api-key` is sent as a bearer token with every request.

Requests run a few at a time (the server batches them). The result cache is keyed by URL and model name:
a server whose model changes under the same name must be run with --no-cache.
"""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from mixq.core.errors import MixqError
from mixq.eval.backend import GenRequest, GenResult
from mixq.eval.textproc import split_reasoning

CONCURRENCY = 4
TIMEOUT = 600.0


class ServerBackend:
    kind = "server"

    def __init__(self, url: str, *, model: str | None = None, no_think: bool = False, chat: bool = True,
                 timeout: float = TIMEOUT, api_key: str | None = None):
        if not url.startswith(("http://", "https://")):
            raise MixqError(f"--server {url}: expected an http:// or https:// URL")
        base = url.rstrip("/")
        self.base = base if base.endswith("/v1") else base + "/v1"
        self.no_think, self.chat, self.timeout = no_think, chat, timeout
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        if model is None:
            data = self._get("/models").get("data") or []
            if not data or "id" not in data[0]:
                raise MixqError(f"{self.base}/models lists no model; pass the model name as MODEL")
            model = data[0]["id"]
        self.model = model

    # ------------------------------------------------------------------------------------------ http
    def _request(self, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method="GET" if body is None else "POST",
                                     headers=self.headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")
            try:
                detail = json.loads(detail)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                pass
            raise MixqError(f"{self.base}{path}: HTTP {e.code}: {str(detail).strip().splitlines()[0][:200]}") from None
        except (urllib.error.URLError, OSError) as e:
            raise MixqError(f"cannot reach {self.base}{path}: {getattr(e, 'reason', e)}") from None
        except ValueError as e:
            raise MixqError(f"{self.base}{path}: not a JSON reply ({e})") from None

    def _get(self, path: str) -> dict:
        return self._request(path)

    def _post(self, path: str, body: dict) -> dict:
        return self._request(path, body)

    def _map(self, fn, items: list) -> list:
        if len(items) <= 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(min(CONCURRENCY, len(items))) as pool:
            return list(pool.map(fn, items))

    # ------------------------------------------------------------------------------------------ identity
    def identity(self) -> dict:
        fp = hashlib.sha256(f"server:{self.base}:{self.model}".encode()).hexdigest()
        return {"name": self.model, "path": self.base, "fingerprint": fp, "size_bytes": None, "kind": self.kind,
                "chat_template": self.chat, "kv_config": False}

    def settings(self) -> dict:
        return {"no_think": self.no_think, "chat": self.chat, "server": self.base}

    # ------------------------------------------------------------------------------------------ generate
    def generate(self, reqs: list[GenRequest]) -> list[GenResult]:
        return self._map(self._generate_one, reqs)

    def _generate_one(self, req: GenRequest) -> GenResult:
        if req.messages is not None and self.chat:
            body = {"model": self.model, "messages": req.messages, "max_tokens": req.max_tokens, "temperature": 0}
            if req.tools:
                body["tools"] = req.tools
            if req.stop:
                body["stop"] = req.stop[:4]
            if self.no_think:
                body["chat_template_kwargs"] = {"enable_thinking": False}
            choice = (self._post("/chat/completions", body).get("choices") or [{}])[0]
            msg = choice.get("message") or {}
            content = msg.get("content") or ""
            reasoning = msg.get("reasoning_content") or msg.get("reasoning") or ""
            r2, answer = split_reasoning(content)
            calls = _tool_calls(msg.get("tool_calls"))
            text = (f"<think>{reasoning}</think>" if reasoning else "") + content
            return GenResult(text=text, reasoning=(reasoning + r2).strip(), answer=answer, tokens=0,
                             finish="length" if choice.get("finish_reason") == "length" else "stop",
                             tool_calls=calls)
        prompt = req.prompt if req.prompt is not None else _transcript(req.messages or [])
        body = {"model": self.model, "prompt": prompt, "max_tokens": req.max_tokens, "temperature": 0}
        if req.stop:
            body["stop"] = req.stop[:4]
        choice = (self._post("/completions", body).get("choices") or [{}])[0]
        text = choice.get("text") or ""
        for s in req.stop:  # servers allow at most 4 stop strings: cut at the rest here
            if s and s in text:
                text = text[: text.find(s)]
        reasoning, answer = split_reasoning(text)
        return GenResult(text=text, reasoning=reasoning, answer=answer, tokens=0,
                         finish="length" if choice.get("finish_reason") == "length" else "stop")


def _tool_calls(raw) -> list[dict] | None:
    if not raw:
        return None
    calls = []
    for tc in raw:
        f = tc.get("function") or {}
        args = f.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                return None  # malformed arguments: the task falls back to parsing the content
        calls.append({"name": f.get("name"), "arguments": args})
    return calls


def _transcript(messages: list[dict]) -> str:
    from mixq.eval.backend import plain_transcript

    return plain_transcript(messages)
