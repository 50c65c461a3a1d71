"""Offline byte-level BPE tokenizers in Nemotron's chat style, for fixtures and the demo model.

The chat template is ChatML with a reasoning block: the assistant turn opens `<think>`; a system prompt
containing `/no_think` or `enable_thinking=false` renders an empty closed block instead. Tool calls use
Nemotron's `<TOOLCALL>[{...}]</TOOLCALL>` JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOLCALL_OPEN, TOOLCALL_CLOSE = "<TOOLCALL>", "</TOOLCALL>"
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD, IM_START, IM_END, THINK_OPEN, THINK_CLOSE, TOOLCALL_OPEN, TOOLCALL_CLOSE]

CHAT_TEMPLATE = (
    # newlines are emitted as {{ '\n' }} so Jinja's whitespace control never eats them
    "{%- set ns = namespace(no_think=false) -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' and m['content'] is string and '/no_think' in m['content'] -%}"
    "{%- set ns.no_think = true -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if enable_thinking is defined and not enable_thinking -%}{%- set ns.no_think = true -%}{%- endif -%}"
    "{%- if tools is defined and tools -%}"
    "<|im_start|>system{{ '\\n' }}You can call these tools. To call one, reply with "
    "<TOOLCALL>[{\"name\": ..., \"arguments\": {...}}]</TOOLCALL>."
    "{%- for t in tools -%}{{ '\\n' }}{{ t | tojson }}{%- endfor -%}<|im_end|>{{ '\\n' }}"
    "{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "<|im_start|>assistant{{ '\\n' }}"
    "{%- if m['content'] -%}{{ m['content'].split('</think>')[-1].lstrip() }}{%- endif -%}"
    "{%- if m['tool_calls'] is defined and m['tool_calls'] -%}<TOOLCALL>["
    "{%- for tc in m['tool_calls'] -%}{%- set f = tc['function'] if tc['function'] is defined else tc -%}"
    "{\"name\": {{ f['name'] | tojson }}, \"arguments\": "
    "{{ f['arguments'] if f['arguments'] is string else f['arguments'] | tojson }}}"
    "{%- if not loop.last -%}, {% endif -%}{%- endfor -%}]</TOOLCALL>{%- endif -%}"
    "<|im_end|>{{ '\\n' }}"
    "{%- elif m['role'] == 'tool' -%}"
    "<|im_start|>user{{ '\\n' }}<tool_response>{{ m['content'] }}</tool_response><|im_end|>{{ '\\n' }}"
    "{%- else -%}"
    "<|im_start|>{{ m['role'] }}{{ '\\n' }}{{ m['content'] }}<|im_end|>{{ '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant{{ '\\n' }}"
    "{%- if ns.no_think -%}<think></think>{%- else -%}<think>{{ '\\n' }}{%- endif -%}"
    "{%- endif -%}"
)


def train_bpe(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE (deterministic for the same texts in the same order)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return tok


def write_tokenizer(tok, out_dir: Path, model_max_length: int = 4096) -> None:
    """Write tokenizer.json, tokenizer_config.json (with the chat template) and special_tokens_map.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    added = {
        str(tok.token_to_id(t)): {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": IM_END,
        "pad_token": PAD,
        "unk_token": UNK,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special = {"bos_token": BOS, "eos_token": IM_END, "pad_token": PAD, "unk_token": UNK}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def special_token_ids(tok) -> dict[str, int]:
    return {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
