"""`mixq serve`: an OpenAI-compatible server for MLX models (laid out like vLLM's entrypoints/openai).

    protocol   request / response schemas (pydantic)
    prompting  chat template, thinking on/off, tools -> token prompt
    parsing    streaming split of reasoning / content / tool calls, stop strings (pure Python)
    sequence   one request's sampling, logits processing and token -> event pipeline
    engine     the model thread: continuous batching or a fair round-robin, prefix cache, cancellation
    responses  engine events -> OpenAI objects and stream chunks
    app        HTTP routes, auth, body limit, OpenAI-style errors
    runner     uvicorn in the foreground or on a thread

Imports mixq.core and mixq.kvcache only (import-linter contract).
"""
