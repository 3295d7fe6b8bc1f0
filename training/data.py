"""Local training data: LLaVA conversation JSON/JSONL, `imagefolder` folders and parquet files.

Every format is read with `datasets.load_dataset` and normalised to one record per row::

    {"messages": [{"role": "user" | "assistant" | "system", "content": str}, ...],
     "images": [PIL.Image, ...], "source": "<file>:row <i>"}

Accepted column layouts (checked in this order):

- `conversations`: LLaVA style, a list of `{"from": "human" | "gpt" | "system", "value": str}` (`user` and
  `assistant` are accepted too); the user text holds one `<image>` per image.
- `messages`: chat style, a list of `{"role", "content": str}`; same placeholder rule.
- `question` + `answer`: one turn; `<image>` placeholders are prepended to the question when it has none.

Images come from an `image` or `images` column: a path (relative paths resolve against `image_folder`, by
default the data file's folder), a list of paths, or a `datasets.Image` value (imagefolder, parquet bytes).

Every row is validated once, before training starts (`ConversationDataset.__init__`): a missing image file,
an unreadable image, a placeholder count that does not match the images, a conversation without an
assistant answer, an answer of only whitespace (it would teach nothing but the end-of-turn token), or a prompt
too long for `max_length` raises `ValueError` naming the file and row. With
`skip_bad_rows=True` such rows are skipped instead and counted in the log (one warning per reason).
"""

from __future__ import annotations

import io
import logging
import os
from collections import Counter
from pathlib import Path

import datasets
import torch
from modeling_deft_llava.processing.image_depth import to_rgb
from PIL import Image

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
ROLE_NAMES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
LAYOUTS = ("conversations", "messages", "question+answer")
FORMATS = ("auto", "json", "imagefolder", "parquet")


class BadRowError(ValueError):
    """A training row that cannot be used; the message names the file and row."""

    def __init__(self, source: str, reason: str, kind: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason
        self.kind = kind


def detect_format(data_path: str | os.PathLike) -> str:
    """`json` for `.json`/`.jsonl` files, `parquet` for `.parquet` files, `imagefolder` for folders."""
    path = Path(data_path)
    if path.is_dir():
        parquet = sorted(path.glob("*.parquet"))
        return "parquet" if parquet and not (path / "metadata.jsonl").exists() else "imagefolder"
    if path.suffix in (".json", ".jsonl"):
        return "json"
    if path.suffix == ".parquet":
        return "parquet"
    raise ValueError(
        f"cannot tell the format of {str(path)!r}: expected a .json/.jsonl/.parquet file or an imagefolder "
        f"folder; pass data_format as one of {FORMATS}"
    )


def load_raw_dataset(data_path: str | os.PathLike, data_format: str = "auto", cache_dir=None):
    """`datasets.Dataset` of the rows of a local file or folder, images left undecoded (paths or bytes)."""
    path = Path(data_path)
    if not path.exists():
        raise FileNotFoundError(f"training data {str(path)!r} does not exist")
    if data_format not in FORMATS:
        raise ValueError(f"data_format must be one of {FORMATS}, got {data_format!r}")
    fmt = detect_format(path) if data_format == "auto" else data_format
    if fmt == "imagefolder":
        raw = datasets.load_dataset("imagefolder", data_dir=str(path), split="train", cache_dir=cache_dir)
    else:
        files = sorted(str(p) for p in path.glob(f"*.{fmt}")) if path.is_dir() else [str(path)]
        if not files:
            raise ValueError(f"{str(path)!r} holds no .{fmt} file")
        empty = [f for f in files if fmt == "json" and not Path(f).read_text(encoding="utf-8").strip()]
        if empty:
            raise ValueError(f"{empty[0]}: the dataset is empty (0 rows)")
        try:
            raw = datasets.load_dataset(fmt, data_files=files, split="train", cache_dir=cache_dir)
        except (datasets.exceptions.DatasetGenerationError, StopIteration, ValueError) as error:
            raise ValueError(
                f"{str(path)!r} cannot be read as {fmt}: {error.__cause__ or error!r}"
            ) from error
    for column in ("image", "images"):
        if column in raw.column_names and isinstance(raw.features[column], datasets.Image):
            raw = raw.cast_column(column, datasets.Image(decode=False))
        if column in raw.column_names and isinstance(
            getattr(raw.features[column], "feature", None), datasets.Image
        ):
            raw = raw.cast_column(column, datasets.Sequence(datasets.Image(decode=False)))
    return raw, fmt


def column_layout(column_names, source: str) -> str:
    """Which of `LAYOUTS` the columns follow; `ValueError` naming the columns when none fits."""
    names = set(column_names)
    if "conversations" in names:
        return "conversations"
    if "messages" in names:
        return "messages"
    if {"question", "answer"} <= names:
        return "question+answer"
    raise ValueError(
        f"{source}: unknown column layout {sorted(names)}; expected a `conversations` column (LLaVA), a "
        "`messages` column (chat), or `question` and `answer` columns, plus an optional `image`/`images` "
        "column"
    )


def _messages(row: dict, layout: str, num_images: int, source: str) -> list[dict]:
    if layout == "question+answer":
        question, answer = row["question"], row["answer"]
        if not isinstance(question, str) or not isinstance(answer, str):
            raise BadRowError(source, "question and answer must be strings", "bad conversation")
        if num_images and IMAGE_TOKEN not in question:
            question = IMAGE_TOKEN * num_images + "\n" + question
        return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    turns = row[layout]
    if not isinstance(turns, list) or not turns:
        raise BadRowError(source, f"`{layout}` must be a non-empty list of turns", "bad conversation")
    role_key, text_key = ("from", "value") if layout == "conversations" else ("role", "content")
    messages = []
    for number, turn in enumerate(turns):
        role = ROLE_NAMES.get(str((turn or {}).get(role_key)).lower())
        text = (turn or {}).get(text_key)
        if role is None or not isinstance(text, str):
            raise BadRowError(
                source,
                f"turn {number} of `{layout}` needs `{role_key}` in {sorted(ROLE_NAMES)} and a string "
                f"`{text_key}`, got {turn!r}",
                "bad conversation",
            )
        messages.append({"role": role, "content": text})
    return messages


def _image_refs(row: dict) -> list:
    value = row.get("images", row.get("image"))
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _open_image(ref, image_folder: Path, source: str) -> Image.Image:
    """Open one image reference (a path, or a `datasets.Image` dict with bytes/path) as RGB (16-bit grey images
    scaled to 8 bits, `processing/image_depth.py`)."""
    if isinstance(ref, dict) and ref.get("bytes"):
        handle = io.BytesIO(ref["bytes"])
        name = ref.get("path") or "<bytes>"
    else:
        path = ref.get("path") if isinstance(ref, dict) else ref
        if not isinstance(path, str) or not path:
            raise BadRowError(
                source, f"image reference {ref!r} is neither a path nor image bytes", "bad image"
            )
        full = Path(path) if os.path.isabs(path) else image_folder / path
        if not full.is_file():
            raise BadRowError(source, f"image file {str(full)!r} does not exist", "missing image")
        handle, name = full, str(full)
    try:
        with Image.open(handle) as image:
            return to_rgb(image)
    except (OSError, ValueError) as error:
        raise BadRowError(source, f"image {name!r} cannot be read: {error}", "bad image") from error


def normalize_row(row: dict, layout: str, image_folder: Path, source: str, load_images: bool = True):
    """One raw row -> `{"messages", "images", "source"}`; `BadRowError` for an unusable row."""
    refs = _image_refs(row)
    messages = _messages(row, layout, len(refs), source)
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRowError(source, "the conversation has no assistant answer to learn", "no answer")
    for number, message in enumerate(messages):
        # an answer of nothing but whitespace would teach only the end-of-turn token
        if message["role"] == "assistant" and not message["content"].strip():
            raise BadRowError(
                source,
                f"the assistant answer in turn {number} is empty ({message['content']!r}): write the answer, or "
                "drop the turn",
                "empty answer",
            )
    if any(IMAGE_TOKEN in m["content"] for m in messages if m["role"] == "assistant"):
        raise BadRowError(
            source, f"an assistant turn holds {IMAGE_TOKEN}; images go in user turns", "bad conversation"
        )
    placeholders = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if placeholders != len(refs):
        what = "the conversation has no image placeholder" if placeholders == 0 else "the conversation has"
        raise BadRowError(
            source,
            f"{what} ({placeholders} {IMAGE_TOKEN}) but the row has {len(refs)} image(s); write one "
            f"{IMAGE_TOKEN} per image in the user text",
            "placeholder mismatch",
        )
    images = [_open_image(ref, image_folder, source) for ref in refs] if load_images else refs
    return {"messages": messages, "images": images, "source": source}


class ConversationDataset(torch.utils.data.Dataset):
    """Validated rows of a local dataset; `__getitem__` returns a normalised record with decoded images.

    Args:
        data_path: a `.json`/`.jsonl`/`.parquet` file, a folder of parquet files, or an imagefolder folder
            (images plus `metadata.jsonl`).
        data_format: `auto` (by suffix) or one of `json`, `imagefolder`, `parquet`.
        image_folder: where relative image paths resolve (default: the data file's folder).
        length_fn: `record -> (prompt_tokens, total_tokens)`, used with `max_length` for the too-long rule.
        max_length: rows whose prompt (text before the first answer token, image blocks included) needs
            `max_length` tokens or more are skipped and counted; longer answers are truncated by the collator.
        skip_bad_rows: skip invalid rows (counted in the log) instead of raising `ValueError`.
    """

    def __init__(
        self,
        data_path,
        data_format: str = "auto",
        image_folder=None,
        length_fn=None,
        max_length: int | None = None,
        skip_bad_rows: bool = False,
        cache_dir=None,
    ):
        self.raw, self.format = load_raw_dataset(data_path, data_format, cache_dir)
        path = Path(data_path)
        self.label = str(path)
        self.image_folder = Path(image_folder) if image_folder else (path if path.is_dir() else path.parent)
        if len(self.raw) == 0:
            raise ValueError(f"{self.label}: the dataset is empty (0 rows)")
        self.layout = column_layout(self.raw.column_names, self.label)
        self.rows: list[int] = []
        self.skipped: Counter = Counter()
        for index in range(len(self.raw)):
            source = self._source(index)
            try:
                record = normalize_row(self.raw[index], self.layout, self.image_folder, source)
                if length_fn is not None and max_length is not None:
                    prompt_tokens, _ = length_fn(record)
                    if prompt_tokens >= max_length:
                        raise BadRowError(
                            source,
                            f"the prompt needs {prompt_tokens} tokens (image blocks included), max_length is "
                            f"{max_length}: no answer token would fit",
                            "too long",
                        )
            except BadRowError as error:
                if not skip_bad_rows and error.kind != "too long":
                    raise
                if not self.skipped[error.kind]:
                    logger.warning("skipping %s (further rows of this kind are only counted)", error)
                self.skipped[error.kind] += 1
                continue
            self.rows.append(index)
        if self.skipped:
            logger.warning(
                "%s: kept %d of %d rows; skipped %s",
                self.label,
                len(self.rows),
                len(self.raw),
                ", ".join(f"{n} {kind}" for kind, n in sorted(self.skipped.items())),
            )
        if not self.rows:
            raise ValueError(f"{self.label}: no usable row left (skipped: {dict(self.skipped)})")

    def _source(self, index: int) -> str:
        if self.format == "imagefolder":
            return f"{self.label}/metadata.jsonl:row {index}"
        return f"{self.label}:row {index}"

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item: int) -> dict:
        index = self.rows[item]
        return normalize_row(self.raw[index], self.layout, self.image_folder, self._source(index))


__all__ = [
    "BadRowError",
    "ConversationDataset",
    "LAYOUTS",
    "FORMATS",
    "column_layout",
    "detect_format",
    "load_raw_dataset",
    "normalize_row",
]
