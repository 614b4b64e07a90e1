"""Tokenising, batching and scoring for quality runs: prompt/target pairs with the loss on the target only,
right-padded batches, the training schedule every method of a seed shares, and per-example scores (the target's
negative log-likelihood; for choice tasks whether the most likely choice is the answer, never by sampling).

A sequence classifier (an encoder, qlora.models.ENCODER_TYPES) reads a choice example's prompt whole and predicts
the answer's index with its head: `Head` gives the quality runs the pairs, batches and scores of either kind, in the
same per-example format (a classifier's `nll` is the cross-entropy of the right class, one "token" per example).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qlora.tasks import Example

IGNORE = -100


# ---- tokenising and batching ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken

    @property
    def target_tokens(self) -> int:
        return sum(lab != IGNORE for lab in self.labels)


def encode(tokenizer, prompt: str, target: str, seq_len: int, eos: int | None) -> Encoded:
    """prompt + target as ids, with labels on the target only (and on the end-of-sequence token, if given). Too long:
    the prompt loses its start first (the end of a prompt is what the target follows), then the target its end."""
    from qlora.data import encode as enc

    p = enc(tokenizer, prompt) if prompt else []
    t = enc(tokenizer, target) + ([eos] if eos is not None else [])
    t = t[:seq_len]
    p = p[len(p) - (seq_len - len(t)):] if len(p) + len(t) > seq_len else p
    return Encoded(p + t, [IGNORE] * len(p) + t)


def training_pairs(tokenizer, examples: list[Example], seq_len: int, eos: int | None) -> list[Encoded]:
    # Text examples are plain language-model text: no end-of-sequence token after a chunk of a play.
    return [encode(tokenizer, e.prompt, e.target, seq_len, eos if e.kind != "text" else None) for e in examples]


def collate(items: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (IGNORE on padding)."""
    width = max(len(x.ids) for x in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, x in enumerate(items):
        n = len(x.ids)
        ids[i, :n] = torch.tensor(x.ids)
        labels[i, :n] = torch.tensor(x.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def schedule(n_examples: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Which training examples each step sees: seeded epochs of a permutation, the same for every method."""
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order += torch.randperm(n_examples, generator=g).tolist()
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


# ---- scoring ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def token_nll(model, items: list[Encoded], pad_id: int, batch_size: int, on_batch=None) -> list[list[float]]:
    """Per item: the negative log-likelihood of each labelled token, in order. Position t's logits predict token
    t+1, so right padding (masked, and after every real token) cannot change a real token's score.
    `on_batch(n)`, if given, is called after each batch of n items (progress)."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(items), batch_size):
        batch = {k: v.to(device) for k, v in collate(items[i:i + batch_size], pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        targets = batch["labels"][:, 1:]
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
        keep = targets != IGNORE
        out += [row[m].tolist() for row, m in zip(nll, keep, strict=True)]
        if on_batch is not None:
            on_batch(len(keep))
    return out


def target_nll(model, items: list[Encoded], pad_id: int, batch_size: int, on_batch=None) -> list[tuple[float, int]]:
    """Per item: summed negative log-likelihood of its labelled tokens and their count."""
    return [(sum(t), len(t)) for t in token_nll(model, items, pad_id, batch_size, on_batch)]


def score(model, tokenizer, examples: list[Example], seq_len: int, eos: int | None, pad_id: int,
          batch_size: int = 16, on_batch=None) -> dict[str, list]:
    """Per held-out example: `nll` and `tokens` of its target as trained (with the end-of-sequence token, except
    for plain text); for choice tasks `correct`, whether the choice with the highest log-likelihood (summed over
    its own tokens, given the prompt) is the answer. One forward pass per choice gives both.
    `on_batch(n)`: called as each batch of n sequences is scored (a choice task scores one per choice)."""
    from qlora.data import encode as enc

    was_training = model.training
    model.eval()
    try:
        if not examples or examples[0].kind != "choice":
            pairs = target_nll(model, training_pairs(tokenizer, examples, seq_len, eos), pad_id, batch_size, on_batch)
            return {"nll": [p[0] for p in pairs], "tokens": [p[1] for p in pairs]}
        flat = [(e, c) for e in examples for c in e.choices]
        per_token = token_nll(model, [encode(tokenizer, e.prompt, c, seq_len, eos) for e, c in flat], pad_id,
                              batch_size, on_batch)
        out, k = {"nll": [], "tokens": [], "correct": []}, 0
        for e in examples:
            rows = per_token[k:k + len(e.choices)]
            lengths = [len(enc(tokenizer, c)) for c in e.choices]
            ll = [-sum(r[:n]) for r, n in zip(rows, lengths, strict=True)]  # the choice's own tokens, no eos
            k += len(e.choices)
            out["correct"].append(int(max(range(len(ll)), key=ll.__getitem__) == e.answer))
            out["nll"].append(sum(rows[e.answer]))
            out["tokens"].append(len(rows[e.answer]))
        return out
    finally:
        model.train(was_training)


def summarise(scores: dict[str, list], metric: str) -> dict:
    loss = sum(scores["nll"]) / sum(scores["tokens"])
    out = {"loss": loss, "perplexity": math.exp(loss)}
    if metric == "accuracy":
        out["accuracy"] = sum(scores["correct"]) / len(scores["correct"])
    out["value"] = out["accuracy"] if metric == "accuracy" else out["perplexity"]
    return out


# ---- sequence classifiers --------------------------------------------------------------------------------------


def class_pairs(tokenizer, examples: list[Example], seq_len: int) -> list[Encoded]:
    """Choice examples for a classifier: the prompt with the tokenizer's own special tokens ([CLS] ... [SEP]), cut
    to seq_len, and the answer's index as the one label."""
    if any(e.kind != "choice" for e in examples):
        raise ValueError("a sequence classifier trains on choice examples only (prompt, choices, answer)")
    return [Encoded(tokenizer(e.prompt, truncation=True, max_length=seq_len)["input_ids"], [e.answer])
            for e in examples]


def collate_classes(items: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch for a classifier: input_ids, attention_mask, labels (one class index per sequence)."""
    batch = collate([Encoded(x.ids, [IGNORE] * len(x.ids)) for x in items], pad_id)
    batch["labels"] = torch.tensor([x.labels[0] for x in items], dtype=torch.long)
    return batch


@torch.no_grad()
def score_classes(model, items: list[Encoded], pad_id: int, batch_size: int = 16, on_batch=None) -> dict[str, list]:
    """Per item: `nll` (cross-entropy of the right class), `tokens` (1) and `correct` (argmax is the answer)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = {"nll": [], "tokens": [], "correct": []}
    try:
        for i in range(0, len(items), batch_size):
            batch = {k: v.to(device) for k, v in collate_classes(items[i:i + batch_size], pad_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            out["nll"] += F.cross_entropy(logits, batch["labels"], reduction="none").tolist()
            out["tokens"] += [1] * len(logits)
            out["correct"] += (logits.argmax(-1) == batch["labels"]).int().tolist()
            if on_batch is not None:
                on_batch(len(logits))
    finally:
        model.train(was_training)
    return out


@dataclass(frozen=True)
class Head:
    """How a quality run trains and scores its model: `classifier` (an encoder's head) or a language model."""

    classifier: bool
    tokenizer: object
    seq_len: int
    eos: int | None
    pad: int

    def pairs(self, examples: list[Example]) -> list[Encoded]:
        if self.classifier:
            return class_pairs(self.tokenizer, examples, self.seq_len)
        return training_pairs(self.tokenizer, examples, self.seq_len, self.eos)

    def collate(self, items: list[Encoded]) -> dict[str, torch.Tensor]:
        return collate_classes(items, self.pad) if self.classifier else collate(items, self.pad)

    def target_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["labels"]) if self.classifier else int((batch["labels"] != IGNORE).sum())

    def score(self, model, examples: list[Example], on_batch=None) -> dict[str, list]:
        if self.classifier:
            return score_classes(model, self.pairs(examples), self.pad, on_batch=on_batch)
        return score(model, self.tokenizer, examples, self.seq_len, self.eos, self.pad, on_batch=on_batch)
