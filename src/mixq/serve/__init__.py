"""`mixq serve`: an OpenAI- and Anthropic-compatible server for MLX models (laid out like vLLM's entrypoints).

    protocol           OpenAI request / response schemas (pydantic)
    prompting          chat template, thinking on/off, tools -> token prompt
    parsing            streaming split of reasoning / content / tool calls, stop strings (pure Python)
    structured         constrained decoding (llguidance): JSON mode, JSON schemas, forced tool calls
    sequence           one request's sampling, logits processing and token -> event pipeline
    engine             the model thread: continuous batching or a fair round-robin, prefix cache, cancellation
    serving            what every route shares: parsing, limits, the chat pipeline, engine hand-off, streaming
    serving_openai     /v1/models, /v1/chat/completions, /v1/completions (render_openai: objects and chunks)
    serving_anthropic  /v1/messages (Anthropic's Messages API)
    serving_responses  /v1/responses (OpenAI's Responses API); render_parts: deltas -> blocks / items
    middleware         Host / Content-Type guard, auth, body limit and deadline, JSON 400s from uvicorn
    app                the ASGI app: routers, guards, errors in each API's shape
    runner             uvicorn in the foreground or on a thread

Imports mixq.core and mixq.kvcache only (import-linter contract).
"""
