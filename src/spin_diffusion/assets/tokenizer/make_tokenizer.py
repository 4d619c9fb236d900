"""Regenerate the tiny CLIP BPE tokenizer shipped with spin_diffusion (vocab.json, merges.txt).

Run from anywhere: ``python src/spin_diffusion/assets/tokenizer/make_tokenizer.py``. The output is
deterministic; tests/test_models.py checks that the shipped files equal what this script writes.

Design:
- Base symbols: every lowercase letter, digit and ASCII punctuation character, each in a bare form
  (inside a word) and a ``</w>`` form (end of word), exactly as CLIP's byte-level BPE spells them.
  CLIP lowercases its input, so any printable ASCII text tokenizes without unknown tokens (it may
  take one token per character outside the word list below).
- Merges: learned by plain BPE training on ``WORDS`` (most frequent adjacent pair first, ties to
  the first seen), until every word is a single token. Replaying merges in rank order, as the
  tokenizer does, then reproduces the training segmentation, so each listed word is one token.
- Special tokens come last, as in CLIP: ``<|startoftext|>`` (bos), ``<|endoftext|>`` (eos, pad, unk).
"""

from __future__ import annotations

import json
import string
import sys
from collections import Counter
from pathlib import Path

# The demo world's caption vocabulary plus a few common caption words. Each becomes a single token.
WORDS: tuple[str, ...] = (
    # articles, prepositions, glue
    "a", "an", "the", "on", "at", "of", "in", "and", "with", "to",
    "photo", "image", "picture",
    # colors
    "red", "green", "blue", "yellow", "orange", "purple", "white", "black", "gray",
    # shapes
    "circle", "square", "triangle", "shape", "star",
    # positions
    "left", "right", "top", "bottom", "center", "middle", "upper", "lower", "side",
    # sizes
    "small", "large", "big",
)  # fmt: skip

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
BASE_CHARS = string.ascii_lowercase + string.digits + string.punctuation


def build() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Return (vocab token -> id, merges in rank order)."""
    for w in WORDS:
        if not w or any(ch not in string.ascii_lowercase for ch in w):
            raise ValueError(f"word {w!r} must be lowercase ASCII letters")
    segs = {w: [*w[:-1], w[-1] + "</w>"] for w in dict.fromkeys(WORDS)}
    merges: list[tuple[str, str]] = []
    while True:
        counts: Counter[tuple[str, str]] = Counter()
        for s in segs.values():
            counts.update(zip(s, s[1:], strict=False))
        if not counts:
            break
        best = max(counts, key=counts.__getitem__)  # first maximal pair in insertion order
        merges.append(best)
        for w, s in segs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            segs[w] = out
    tokens = [*BASE_CHARS, *(c + "</w>" for c in BASE_CHARS), *(a + b for a, b in merges), *SPECIAL_TOKENS]
    vocab: dict[str, int] = {}
    for tok in tokens:
        vocab.setdefault(tok, len(vocab))
    return vocab, merges


def write(out_dir: Path) -> None:
    """Write vocab.json and merges.txt into ``out_dir``."""
    vocab, merges = build()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, indent=1, ensure_ascii=True) + "\n", encoding="utf-8")
    lines = ["#version: 0.2 - tiny spin_diffusion tokenizer (make_tokenizer.py)", *(f"{a} {b}" for a, b in merges)]
    (out_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    write(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
