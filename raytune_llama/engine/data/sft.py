"""Supervised fine-tuning rows → token ids and a per-token target mask (docs/data.md
"Supervised fine-tuning data").

A chat row (`data.format: chat`) is a list of {role, content} messages rendered with the
tokenizer's chat template (or `data.chat_template`). The mask must mark exactly the tokens of
the assistant turns, and a template's output cannot be cut by string search (every template
formats turns differently), so the conversation is rendered once per assistant turn: the
text before turn i with the generation prompt, then through turn i. Their differences are the
pieces — prompt, answer, prompt, answer, ... — tokenized one by one and concatenated, so that a
piece boundary is a token boundary. A template whose renderings are not prefixes of each other
cannot be split this way and is refused with the row it failed on.

An instruction row (`data.format: instruction`) fills `data.prompt_template` with the row's
columns ({instruction}, {input}, ...); a paragraph of the template whose fields are all empty
is dropped (Alpaca rows without an input); the answer is `data.response_column`.

The document's EOS (added by the packer) is a target when the document ends with an answer, so
the model learns to stop. Rows without an answer are skipped and counted like empty rows.
"""
from __future__ import annotations

import string
from typing import Any, Optional, Sequence

import numpy as np


class TemplateError(ValueError):
    """A chat template that cannot be split into turns; names the option to change."""


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return "" if value is None else str(value)


def template_fields(template: str) -> list[str]:
    """The {column} names a prompt template uses, in order, each once."""
    names = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is not None and name not in names:
            names.append(name)
    return names


def render_prompt(template: str, row: dict) -> str:
    """The prompt of an instruction row: template paragraphs with all fields empty are dropped."""
    kept = []
    for paragraph in template.split("\n\n"):
        fields = template_fields(paragraph)
        values = {f: _text(row.get(f)) for f in fields}
        if fields and not any(v.strip() for v in values.values()):
            continue
        kept.append(paragraph.format(**values))
    return "\n\n".join(kept)


def instruction_pieces(row: Any, template: str, response_column: str) -> Optional[list[tuple[str, bool]]]:
    """[(prompt, False), (answer, True)], or None for a row without a usable answer."""
    if not isinstance(row, dict):
        return None
    answer = _text(row.get(response_column))
    if not answer.strip():
        return None
    return [(render_prompt(template, row), False), (answer, True)]


def _messages(row: Any, messages_column: str) -> Optional[list[dict]]:
    messages = row.get(messages_column) if isinstance(row, dict) else None
    if not isinstance(messages, (list, tuple)) or not messages:
        return None
    out = []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            return None
        out.append({"role": _text(m["role"]), "content": _text(m.get("content"))})
    return out


def chat_pieces(tokenizer, row: Any, messages_column: str,
                chat_template: Optional[str] = None) -> Optional[list[tuple[str, bool]]]:
    """[(text, is_answer)] covering the whole rendered conversation, or None for a row without
    an assistant turn (or not a message list)."""
    messages = _messages(row, messages_column)
    if messages is None or not any(m["role"] == "assistant" for m in messages):
        return None

    def render(upto: int, generation_prompt: bool) -> str:
        if upto == 0 and generation_prompt is False:
            return ""
        return tokenizer.apply_chat_template(messages[:upto], tokenize=False, chat_template=chat_template,
                                             add_generation_prompt=generation_prompt)

    pieces, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(i, True), render(i + 1, False)
        if not before.startswith(done) or not through.startswith(before):
            raise TemplateError(
                "data.chat_template: the chat template's rendering of a conversation is not a prefix of its "
                "rendering with one more turn, so the answers cannot be masked "
                f"(at message {i} of {messages!r:.200}); set data.chat_template to a template that "
                "renders turns in order")
        pieces += [(before[len(done):], False), (through[len(before):], True)]
        done = through
    rest = render(len(messages), False)[len(done):]
    if rest:
        pieces.append((rest, False))
    return [(text, answer) for text, answer in pieces if text]


def tokenize_examples(tokenizer, examples: Sequence[Sequence[tuple[str, bool]]], train_on_prompt: bool
                      ) -> tuple[list[list[int]], list[np.ndarray], list[bool]]:
    """Token ids, uint8 target masks and whether each document's EOS is a target (it ends with
    an answer), for a batch of examples' pieces: one tokenizer call for all their pieces."""
    texts = [text for pieces in examples for text, _ in pieces]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    ids_out, masks_out, eos_out, at = [], [], [], 0
    for pieces in examples:
        ids: list[int] = []
        masks = []
        for (_, answer), tokens in zip(pieces, encoded[at:at + len(pieces)]):
            ids.extend(tokens)
            masks.append(np.full(len(tokens), 1 if (answer or train_on_prompt) else 0, dtype=np.uint8))
        at += len(pieces)
        ids_out.append(ids)
        masks_out.append(np.concatenate(masks) if masks else np.zeros(0, dtype=np.uint8))
        eos_out.append(bool(pieces) and (pieces[-1][1] or train_on_prompt))
    return ids_out, masks_out, eos_out


def example_pieces(spec: dict, tokenizer, row: Any) -> Optional[list[tuple[str, bool]]]:
    """The pieces of one chat or instruction row under a store spec (None: skip the row)."""
    if spec["row_format"] == "chat":
        return chat_pieces(tokenizer, row, spec["messages_column"], spec.get("chat_template"))
    return instruction_pieces(row, spec["prompt_template"], spec["response_column"])


def source_columns(spec: dict):
    """What to read of each row: the text column, or the tuple of columns an example needs."""
    fmt = spec.get("row_format", "text")
    if fmt == "chat":
        return (spec["messages_column"],)
    if fmt == "instruction":
        return tuple(template_fields(spec["prompt_template"])) + (spec["response_column"],)
    return spec["text_column"]


def has_chat_template(tokenizer, chat_template: Optional[str]) -> bool:
    return bool(chat_template) or bool(getattr(tokenizer, "chat_template", None))
