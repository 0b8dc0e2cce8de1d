"""Tokenizer wrapper over a checkpoint's own Hugging Face tokenizer (local files only, no remote code).

Chat prompts are rendered with the checkpoint's chat template; streaming text comes from an incremental
detokenizer (model/text/detok.py); tool calls in generated text are parsed by serve/protocol/toolcalls.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from model.text.detok import IncrementalDetokenizer, PrefixDetokenizer, byte_table

__all__ = ["Tokenizer", "IncrementalDetokenizer"]


class Tokenizer:
    def __init__(self, hf_tokenizer):
        tok = hf_tokenizer
        self.hf = tok
        self.eos_token_id: int = tok.eos_token_id
        self.pad_token_id: int = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.bos_token_id: int | None = tok.bos_token_id
        self.vocab_size: int = len(tok)
        added = {i: t for i, t in tok.added_tokens_decoder.items()}
        self._special_ids = frozenset(i for i, t in added.items() if t.special) | frozenset(tok.all_special_ids)
        self._byte_level = _is_byte_level(tok)
        self._table: list[bytes] | None = None
        self._added = {i: t.content for i, t in added.items()}

    @classmethod
    def from_dir(cls, path) -> Tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(Path(path)), local_files_only=True, trust_remote_code=False)
        return cls(tok)

    @property
    def chat_template(self) -> str | None:
        return getattr(self.hf, "chat_template", None)

    def encode(self, text: str) -> list[int]:
        # verbose=False: the server enforces its own limits (MAX_INPUT_TOKENS); the tokenizer's
        # model_max_length warning ("sequence length is longer than the specified maximum") would be noise.
        return list(self.hf.encode(text, add_special_tokens=False, verbose=False))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages, tools=None, documents=None, add_generation_prompt: bool = True,
                    **template_kwargs) -> str:
        if not self.chat_template:
            raise ValueError("this checkpoint's tokenizer has no chat template")
        return self.hf.apply_chat_template(
            list(messages), tools=tools, documents=documents, add_generation_prompt=add_generation_prompt,
            tokenize=False, **template_kwargs,
        )

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def token_text(self, token_id: int) -> str:
        """Text of one token on its own (partial UTF-8 shows as U+FFFD): for per-token details."""
        return self.hf.decode([token_id], skip_special_tokens=False)

    def detokenizer(self, skip_special_tokens: bool = True):
        """A fresh incremental detokenizer: .push(id) -> new text, .finish() -> flushed tail, .text.
        Special tokens (e.g. <|end_of_text|>) add no text unless skip_special_tokens is False."""
        skip = self._special_ids if skip_special_tokens else frozenset()
        if not self._byte_level:
            return PrefixDetokenizer(lambda ids: self.decode(ids, skip_special_tokens), skip)
        if self._table is None:
            tokens = self.hf.convert_ids_to_tokens(list(range(self.vocab_size)))
            self._table = byte_table(tokens, self._added)
        return IncrementalDetokenizer(self._table, skip)


def _is_byte_level(tok) -> bool:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return False
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    return decoder.get("type") == "ByteLevel"
