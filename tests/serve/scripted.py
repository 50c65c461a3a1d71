"""A one-layer model trained here to say three scripted replies (for the serve tests).

A fixture model with random weights says nothing useful, so the reasoning and tool-call round trips use a
one-layer model trained in a few seconds to say exactly three scripted replies (a tool call, an answer from
the tool's result, a greeting), each with a think block. The server renders, decodes and parses them like
any model's output: nothing in the server knows about the script.
"""

from __future__ import annotations

import json
import shutil

import mixq  # noqa: F401
import mlx.core as mx

from mixq.core.modelio import load

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
ASK = [{"role": "user", "content": "Weather in Paris?"}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
ANSWERED = ASK + [{"role": "assistant", "content": None, "tool_calls": [CALL]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
HI = [{"role": "user", "content": "Say hi."}]
SCRIPT = [  # (messages, tools, completion)
    (ASK, TOOLS, 'I should call the tool.\n</think>\n<TOOLCALL>[{"name": "get_weather", "arguments": '
                 '{"city": "Paris"}}]</TOOLCALL><|im_end|>'),
    (ANSWERED, TOOLS, "The tool answered.\n</think>\nIt is sunny in Paris.<|im_end|>"),
    (HI, None, "A greeting is needed.\n</think>\nHi there!<|im_end|>"),
]


def train_scripted(base, out, steps=2000):
    """Overfit a 1-layer copy of the qwen3 fixture on SCRIPT (prompts rendered by the server's own code).

    Trains until every scripted token is the argmax (checked every 10 steps), however many steps the BLAS's
    summation order makes that take; a run that never gets there fails here, by name, not in a later test."""
    import importlib

    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten

    from mixq.serve.prompting import build_chat_prompt
    from mixq.serve.protocol import ChatMessage

    shutil.copytree(base, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(num_hidden_layers=1, torch_dtype="float32")
    (out / "config.json").write_text(json.dumps(cfg))
    tok = load(str(base)).tokenizer
    rows = []
    for messages, tools, completion in SCRIPT:
        p = build_chat_prompt(tok, [ChatMessage.model_validate(m) for m in messages], tools=tools)
        rows.append((p.tokens, tok.encode(completion, add_special_tokens=False)))
    arch = importlib.import_module("mlx_lm.models.qwen3")
    mx.random.seed(0)
    model = arch.Model(arch.ModelArgs.from_dict(cfg))
    width = max(len(a) + len(b) for a, b in rows)
    x = mx.array([(a + b + [0] * width)[:width] for a, b in rows])
    # the loss also covers the prompt's last token (the `\n` after `<think>`), which lm-eval counts as part of
    # the continuation (it moves a context's trailing whitespace there)
    mask = mx.array([[float(len(a) - 2 <= i < len(a) + len(b) - 1) for i in range(width - 1)] for a, b in rows])

    def loss_fn(m):
        ce = nn.losses.cross_entropy(m(x[:, :-1]), x[:, 1:], reduction="none")
        return (ce * mask).sum() / mask.sum()

    opt = optim.Adam(learning_rate=2e-2)
    step = nn.value_and_grad(model, loss_fn)
    converged = False
    for i in range(steps):
        loss, grads = step(model)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        if i % 10 == 9:
            hits = ((model(x[:, :-1]).argmax(-1) == x[:, 1:]) * mask).sum()
            if hits.item() == mask.sum().item() and loss.item() < 0.05:
                converged = True
                break
    assert converged, f"the scripted fixture did not learn its script in {steps} steps (loss {loss.item():.3g})"
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    return out
