"""An offline CLIP BPE tokenizer, generated locally.

The tiny tokenizers diffusers' tests use live on a model hub. This one is built
from scratch: the 256 byte-level symbols of CLIP's BPE (with and without the
end-of-word marker ``</w>``), then merges that assemble a given word list into
single tokens. Any text tokenizes (unknown words fall back to pieces); the listed
words cost one token each, which keeps tiny text encoders cheap.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# Words of the shapes world's caption grammar plus common probe words.
DEFAULT_WORDS = (
    "a", "an", "and", "on", "the", "of", "with", "in", "background", "photo", "picture",
    "red", "green", "blue", "yellow", "orange", "purple", "white", "gray", "black",
    "circle", "square", "triangle", "shape", "shapes",
)


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from bytes to printable unicode symbols."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def _apply_bpe(parts: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Standard BPE: repeatedly merge the adjacent pair with the best (lowest) rank."""
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), len(ranks) + 1), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank > len(ranks):
            break
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
    return parts


def bpe_tables(words: tuple[str, ...] = DEFAULT_WORDS) -> tuple[dict[str, int], list[str]]:
    """Vocabulary and merge list making each of ``words`` a single token.

    Each new merge gets the lowest priority, joining the first two pieces that the
    merges so far leave; words handled earlier still end as one token because some
    earlier merge always applies before the new one could.
    """
    to_unicode = _bytes_to_unicode()
    symbols = list(to_unicode.values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(w.lower() for w in words):
        encoded = "".join(to_unicode[b] for b in word.encode("utf-8"))
        parts = _apply_bpe(list(encoded[:-1]) + [encoded[-1] + "</w>"], ranks)
        while len(parts) > 1:
            ranks[(parts[0], parts[1])] = len(ranks)
            vocab_list.append(parts[0] + parts[1])
            parts = _apply_bpe(parts, ranks)
    vocab_list += [BOS, EOS]
    merges = [f"{a} {b}" for (a, b), _ in sorted(ranks.items(), key=lambda kv: kv[1])]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def build_tokenizer(model_max_length: int = 16, words: tuple[str, ...] = DEFAULT_WORDS) -> CLIPTokenizer:
    """A CLIPTokenizer that needs no download."""
    vocab, merges = bpe_tables(words)
    pairs = [tuple(m.split(" ")) for m in merges]
    return CLIPTokenizer(vocab=vocab, merges=pairs, model_max_length=model_max_length)


def write_tokenizer_files(folder: str | Path, words: tuple[str, ...] = DEFAULT_WORDS) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` in the layout of CLIP's originals."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = bpe_tables(words)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder
