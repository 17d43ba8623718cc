"""LLaVA-Instruct conversations with their images, tokenized by the one prompt builder, and batched.

`llava_instruct_150k.json` is a list of `{"id", "image", "conversations": [{"from": "human"|"gpt",
"value"}...]}` with `<image>` in the first human turn; images are COCO files in a folder. A record
that is malformed or whose image is missing or unreadable is skipped and counted, never fatal; a
data file that is missing, empty or not JSON is a `DataError` naming the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from mmft.config import MMFTConfig
from mmft.prompt import IGNORE_INDEX, IMAGE_TEXT, Encoded, encode_chat
from mmft.vision import ImageError, open_image

logger = logging.getLogger(__name__)
ROLES = {"human": "user", "gpt": "assistant"}


class DataError(ValueError):
    """A data file (or feature cache) that cannot be used; the message names it and says why."""


@dataclass
class Record:
    id: str
    image: str | None  # file name relative to the image folder; None for a text-only conversation
    turns: list[tuple[str, str]]


@dataclass
class ReadReport:
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) or "none"
        return f"read {self.kept} conversations, skipped {sum(self.skipped.values())} ({reasons})"


def parse_conversation(raw) -> list[tuple[str, str]] | None:
    """LLaVA turns -> [("user", q), ("assistant", a), ...], or None when malformed."""
    if not isinstance(raw, list) or len(raw) < 2 or len(raw) % 2:
        return None
    turns = []
    for i, turn in enumerate(raw):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return None
        role = ROLES.get(turn.get("from"))
        if role != ("user" if i % 2 == 0 else "assistant"):
            return None
        text = turn["value"].replace(IMAGE_TEXT, "").strip()
        if not text:
            return None
        turns.append((role, text))
    return turns


def image_file_problem(image_dir: str | Path | None) -> Callable[[str], str | None]:
    """The default check of a record's image: the file exists and its header reads."""
    def problem(name: str) -> str | None:
        path = Path(image_dir) / name if image_dir is not None else None
        if path is None or not path.is_file():
            return "missing image"
        try:
            with open_image(path) as image:  # reads the header only
                image.size
        except (OSError, ValueError, SyntaxError):
            return "unreadable image"
        return None
    return problem


def load_json(path: str | Path):
    """A JSON data file, or a DataError that names it and says what is wrong (missing, empty, cut)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found" + (" (it is a folder)" if path.is_dir() else ""))
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise DataError(f"{path}: the data file is empty; expected a JSON list of conversations")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON at line {err.lineno}, column {err.colno} ({err.msg}); "
                        "is the file truncated? Download or write it again") from None


def read_llava(json_path: str | Path, image_dir: str | Path | None, offset: int = 0, limit: int | None = None,
               image_problem: Callable[[str], str | None] | None = None) -> tuple[list[Record], ReadReport]:
    """Read records `offset .. offset+limit` of a LLaVA-Instruct JSON file, skipping bad ones.

    `image_problem(name)` says why a record's image cannot be used (None: it can); by default the
    file must exist in `image_dir` and its header read. Training from a feature cache passes the
    cache's check instead, so no image file is opened."""
    raw_records = load_json(json_path)
    if not isinstance(raw_records, list):
        raise DataError(f"{json_path}: expected a JSON list of conversations, got {type(raw_records).__name__}")
    end = None if limit is None else offset + limit
    image_problem = image_problem or image_file_problem(image_dir)
    records, report = [], ReadReport()
    for raw in raw_records[offset:end]:
        if not isinstance(raw, dict):
            report.skipped["malformed record"] += 1
            continue
        turns = parse_conversation(raw.get("conversations"))
        if turns is None:
            report.skipped["malformed conversation"] += 1
            continue
        image = raw.get("image")
        if image is not None:
            problem = image_problem(str(image))
            if problem:
                report.skipped[problem] += 1
                continue
        records.append(Record(str(raw.get("id", len(records))), image, turns))
        report.kept += 1
    logger.info(report.summary())
    return records, report


def split_key(record: Record) -> float:
    """Where `record` falls in [0, 1) for the evaluation split: a hash of its picture (of its first turn
    when it has none), never its place in the file or a seed. A picture is then held out by every round,
    whatever its window or seed, and with all its conversations: no round trains on an image that
    another round evaluates on."""
    key = record.image if record.image is not None else record.turns[0][1]
    # surrogatepass: a file name that is not UTF-8 (listed by Python as "caf\udce9.png") hashes too
    return int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:8], "big") / 2**64


def split_records(records: list[Record], fraction: float, limit: int) -> tuple[list[Record], list[Record]]:
    """(train, eval): eval is the records whose `split_key` is under `fraction`, the `limit` lowest kept;
    the others held out are in neither (they stay unseen). At least one picture is held out, with all its
    conversations: the lowest key, as the split of a file too small for `fraction` (that one is stable only
    within its window)."""
    keys = {id(r): split_key(r) for r in records}
    lowest = min(keys.values())
    held = {i for i, key in keys.items() if key < fraction} or {i for i, key in keys.items() if key == lowest}
    held_out = sorted((r for r in records if id(r) in held), key=lambda r: keys[id(r)])
    return [r for r in records if id(r) not in held], held_out[:limit]


class ConversationDataset(torch.utils.data.Dataset):
    """Records -> encoded examples. `load_image(record)` returns `{"pixel_values": [3, H, W]}` or
    `{"image_features": [N_tok, D_v]}` (from a feature cache); an image that fails to decode here is
    counted in `report` and replaced by the next record, so a run never crashes on one bad file."""

    def __init__(self, records: list[Record], tokenizer, cfg: MMFTConfig, num_image_tokens: int,
                 load_image: Callable[[Record], dict], report: ReadReport | None = None):
        self.records, self.tokenizer, self.cfg = records, tokenizer, cfg
        self.num_image_tokens, self.load_image = num_image_tokens, load_image
        self.report = report or ReadReport(kept=len(records))
        self._unreadable: set[int] = set()  # found so at load time: not tried (or counted) again

    def __len__(self) -> int:
        return len(self.records)

    def encode(self, record: Record) -> Encoded:
        n = self.num_image_tokens if record.image is not None else 0
        return encode_chat(self.tokenizer, self.cfg, record.turns, num_image_tokens=n)

    def __getitem__(self, index: int) -> dict:
        for step in range(len(self.records)):
            i = (index + step) % len(self.records)
            if i in self._unreadable:
                continue
            record = self.records[i]
            try:
                image = self.load_image(record) if record.image is not None else {}
            except ImageError as err:
                self._unreadable.add(i)
                self.report.skipped["unreadable image"] += 1
                logger.warning("skipping %s: %s", record.image, err)
                continue
            encoded = self.encode(record)
            return {"input_ids": encoded.input_ids, "labels": encoded.labels,
                    "image_mask": encoded.image_mask, **image}
        raise DataError(f"none of the {len(self.records)} records has an image that decodes "
                        "(each file's header reads, its pixels do not): is the image folder damaged?")


def pad_batch(encoded: list[dict], pad_token_id: int, padding_side: str = "right",
              pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Pad to the longest row (or `pad_to`); labels padded with -100, image slots with False."""
    length = max(len(e["input_ids"]) for e in encoded)
    if pad_to is not None:
        if pad_to < length:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest example ({length} tokens)")
        length = pad_to
    batch = {"input_ids": [], "labels": [], "attention_mask": [], "image_mask": []}
    for e in encoded:
        n = length - len(e["input_ids"])
        rows = {"input_ids": (e["input_ids"], pad_token_id),
                "labels": (e.get("labels", [IGNORE_INDEX] * len(e["input_ids"])), IGNORE_INDEX),
                "attention_mask": ([1] * len(e["input_ids"]), 0),
                "image_mask": (e["image_mask"], False)}
        for key, (values, fill) in rows.items():
            batch[key].append([fill] * n + list(values) if padding_side == "left" else list(values) + [fill] * n)
    out = {key: torch.tensor(rows) for key, rows in batch.items()}
    for key in ("pixel_values", "image_features"):
        images = [e[key] for e in encoded if key in e]
        if images:
            out[key] = torch.stack(images)
    return out


@dataclass
class Collator:
    """Dynamic padding for training: each batch is as long as its longest example, no longer."""

    pad_token_id: int
    pad_to: int | None = None  # a fixed length, only to measure what dynamic padding saves

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return pad_batch(examples, self.pad_token_id, "right", self.pad_to)
