"""Byte-level BPE tokenizer for the demo checkpoints, trained locally and deterministically.

The corpus is generated here (no download): a few hand-written English paragraphs plus sentences
assembled from word lists with a fixed-seed RNG, some JSON and code so tool-call text tokenizes into
sensible pieces, and a little non-ASCII so multi-byte characters get merges. Byte-level BPE covers
every byte, so any text round-trips.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from model.text.chat_template import CHAT_TEMPLATE

EOS = "<|end_of_text|>"
PAD = "<|pad|>"
# (content, special). Special tokens are dropped by decode(skip_special_tokens=True); the tool-call
# markers are atomic added tokens but not special, so they survive skip_special_tokens and the
# tool-call parser still sees them (as in Granite 4.0).
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    (PAD, True),
    (EOS, True),
    ("<|start_of_role|>", True),
    ("<|end_of_role|>", True),
    ("<|tool_call|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
)

_PARAGRAPHS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Machine learning models turn text into tokens, tokens into vectors, and vectors back into text.
The assistant answers questions about the weather, the time, travel plans, recipes and software.
Hello! How can I help you today? I would like to book a table for two people at seven o'clock.
What is the capital of France? The capital of France is Paris. What is two plus two? It is four.
Please summarize the following document in three sentences, and list the key points as bullets.
The server accepts requests over HTTP, queues them, and streams tokens back as they are generated.
State space models keep a fixed-size state per sequence, while attention layers keep keys and values.
On Monday we went to the market; on Tuesday it rained; by Friday the river had risen by two meters.
Café, naïve, résumé, über, São Paulo, Zürich, 東京, 北京, Привет, مرحبا, こんにちは, 😀 👍 🚀 ✨.
"""

_SUBJECTS = "the user|a model|the server|my friend|the weather|our team|this function|the city|a cat|the river"
_VERBS = "is|was|will be|seems|became|returns|calls|needs|wants|finds|reads|writes|sends|gets|makes"
_OBJECTS = (
    "a result|the answer|some data|a new token|the request|a short story|the time|an error|"
    "the temperature|a list of items|the document|three apples|a small house|the best option"
)
_ADVERBS = "today|quickly|again|in the morning|at night|very well|for a while|right now|slowly|carefully"
_TOOLS = ("get_weather", "get_time", "search", "book_table", "send_email", "convert_currency")
_CITIES = ("Paris", "Boston", "Tokyo", "Berlin", "Lagos", "Lima", "Sydney", "Toronto", "Madrid", "Seoul")


_ONSETS = ("", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "st", "tr", "ch", "sh", "th")
_NUCLEI = ("a", "e", "i", "o", "u", "ou", "ea", "ai", "io")
_CODAS = ("", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "st", "ck")


def _made_up_words(rng: random.Random, n: int) -> list[str]:
    # English-looking syllable words: enough distinct pairs for a few thousand BPE merges.
    return [
        "".join(rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS) for _ in range(rng.randint(1, 3)))
        for _ in range(n)
    ]


def corpus(n_sentences: int = 4000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = _made_up_words(rng, 3000)
    subjects, verbs = _SUBJECTS.split("|"), _VERBS.split("|")
    objects, adverbs = _OBJECTS.split("|"), _ADVERBS.split("|")
    lines = _PARAGRAPHS.splitlines()
    for i in range(n_sentences):
        s = f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} {rng.choice(adverbs)}."
        lines.append(s[0].upper() + s[1:] + (f" It costs {rng.randint(0, 999)} dollars." if i % 5 == 0 else ""))
        if i % 7 == 0:
            args = {"location": rng.choice(_CITIES), "unit": rng.choice(["celsius", "fahrenheit"])}
            lines.append(json.dumps({"name": rng.choice(_TOOLS), "arguments": args}))
        if i % 11 == 0:
            lines.append(f"def {rng.choice(_TOOLS)}(x, y={rng.randint(0, 9)}):\n    return x + y  # sum")
        lines.append(" ".join(rng.choice(words) for _ in range(12)).capitalize() + ".")
    return lines


def train_tokenizer(vocab_size: int, seed: int = 0):
    """A `tokenizers.Tokenizer` with `vocab_size` entries (bytes + merges + added tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = [content for content, _ in ADDED_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials,  # ids 0..len-1, in ADDED_TOKENS order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed=seed), trainer=trainer)
    return tok


def write_tokenizer(out_dir: Path, vocab_size: int, model_max_length: int, seed: int = 0) -> int:
    """Writes tokenizer.json, tokenizer_config.json, special_tokens_map.json; returns the vocab size."""
    from tokenizers import AddedToken

    tok = train_tokenizer(vocab_size, seed=seed)
    # Re-register added tokens with their final flags (special or not, no whitespace stripping).
    tok.add_special_tokens([AddedToken(c, special=True, normalized=False) for c, s in ADDED_TOKENS if s])
    tok.add_tokens([AddedToken(c, special=False, normalized=False) for c, s in ADDED_TOKENS if not s])
    tok.save(str(out_dir / "tokenizer.json"), pretty=True)
    added = {
        str(tok.token_to_id(content)): {
            "content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": special,
        }
        for content, special in ADDED_TOKENS
    }
    config = {
        "added_tokens_decoder": added,
        "bos_token": EOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": EOS,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "padding_side": "left",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    specials_map = {"bos_token": EOS, "eos_token": EOS, "pad_token": PAD, "unk_token": EOS}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials_map, indent=2) + "\n")
    return tok.get_vocab_size(with_added_tokens=True)
