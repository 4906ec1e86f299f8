"""Prompt data: rows from JSONL or Parquet files, tokenized once, and a resumable step sampler.

    files --read_rows--> rows (dicts) --PromptDataset--> prompt_ids, prompts, ground_truths, extras
    (seed, step) --StepSampler.indices--> the row indices of that training step

Every row is checked when the dataset is built, so a bad file fails before the first step with
the file, the row and the key named. A prompt is a string (tokenized with the tokenizer's special
tokens, e.g. a leading bos) or a chat message list [{"role": ..., "content": ...}] (rendered with
the tokenizer's chat template and add_generation_prompt=True). `prompts[i]` keeps the full text
(or rendered chat) even when its ids were truncated. The optional `ground_truth` column is handed
to the reward function; every other column is kept in `extras[i]`.

StepSampler is a pure function of (seed, step): a run resumed at step k draws exactly the rows
the uninterrupted run drew at step k, without saving any sampler state.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

TRUNCATIONS = ("error", "left", "right")
"""What a too-long prompt does (the values of data.truncation)."""
SUPPORTED_SUFFIXES = (".jsonl", ".parquet")
GROUND_TRUTH_KEY = "ground_truth"


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a JSONL file (one JSON object per non-empty line) or a Parquet file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise ValueError(f"prompt file {str(path)!r} has the extension {suffix or '(none)'!r}: "
                         f"supported are {', '.join(SUPPORTED_SUFFIXES)} (JSON lines or Parquet)")
    if not path.is_file():
        raise ValueError(f"prompt file {str(path)!r} does not exist: check data.train_files / "
                         "data.val_files")
    if suffix == ".parquet":
        return _read_parquet(path)
    rows = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}): "
                                 "prompt files must be UTF-8 JSON lines") from e
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg} at column "
                                 f"{e.colno}): each line must be one JSON object") from e
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_no}: a JSON {type(row).__name__}, expected an "
                                 'object such as {"prompt": "...", "ground_truth": "..."}')
            rows.append(row)
    return rows


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"reading {str(path)!r} needs pyarrow: pip install pyarrow (or give "
                          "the prompts as a .jsonl file)") from e
    return pq.read_table(path).to_pylist()


class PromptDataset:
    """Tokenized prompts: `prompt_ids[i]` (list[int]), `prompts[i]`, `ground_truths[i]` (or
    None), `extras[i]` (the other columns) and `rows[i]` (the row as read)."""

    def __init__(self, rows: Sequence[dict], tokenizer, *, prompt_key: str = "prompt",
                 max_prompt_length: int = 512, truncation: str = "error", source: str = ""):
        if truncation not in TRUNCATIONS:
            raise ValueError(f"truncation={truncation!r}, expected one of {TRUNCATIONS}")
        if isinstance(max_prompt_length, bool) or not isinstance(max_prompt_length, int) \
                or max_prompt_length < 1:
            raise ValueError(f"max_prompt_length={max_prompt_length!r}, expected a positive "
                             "number of tokens")
        self.source = source or "prompt rows"
        self.rows = list(rows)
        self.prompts: list = []
        self.ground_truths: list = []
        self.extras: list[dict] = []
        chats = []  # (position, messages) of chat-format prompts
        for i, row in enumerate(self.rows):
            prompt = _check_row(row, i, prompt_key, self.source)
            if isinstance(prompt, list):
                chats.append((i, prompt))
            self.prompts.append(prompt)
            self.ground_truths.append(row.get(GROUND_TRUTH_KEY))
            self.extras.append({k: v for k, v in row.items()
                                if k not in (prompt_key, GROUND_TRUTH_KEY)})
        self.prompt_ids = self._tokenize(tokenizer, chats)
        for i, ids in enumerate(self.prompt_ids):
            if len(ids) > max_prompt_length:
                self.prompt_ids[i] = _truncate(ids, max_prompt_length, truncation,
                                               f"{self.source} row {i}")

    def _tokenize(self, tokenizer, chats: list[tuple[int, list]]) -> list[list[int]]:
        ids: list = [None] * len(self.prompts)
        texts = [(i, p) for i, p in enumerate(self.prompts) if isinstance(p, str)]
        if texts:
            try:
                encoded = tokenizer([p for _, p in texts], add_special_tokens=True)["input_ids"]
            except Exception as e:
                self._raise_for_bad_text(tokenizer, texts, e)
            for (i, _), row_ids in zip(texts, encoded):
                ids[i] = list(row_ids)
        if chats:
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError(f"{self.source} row {chats[0][0]}: the prompt is a chat message "
                                 "list but the tokenizer has no chat template: give string "
                                 "prompts, or a tokenizer folder whose tokenizer_config.json "
                                 "has a chat_template")
            messages = [m for _, m in chats]
            rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                     tokenize=False)
            encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                    tokenize=True, return_dict=True)["input_ids"]
            for (i, _), text, row_ids in zip(chats, rendered, encoded):
                self.prompts[i] = text
                ids[i] = list(row_ids)
        return ids

    def _raise_for_bad_text(self, tokenizer, texts: list[tuple[int, str]], error: Exception):
        # The batched call does not say which prompt failed (a character outside a char
        # tokenizer's alphabet, say): find it one by one.
        for i, text in texts:
            try:
                tokenizer(text, add_special_tokens=True)
            except Exception as e:
                raise ValueError(f"{self.source} row {i}: the tokenizer cannot encode the prompt "
                                 f"{text!r:.80}: {e}") from e
        raise error

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def __getitem__(self, i: int) -> dict:
        return {"prompt_ids": self.prompt_ids[i], "prompt": self.prompts[i],
                "ground_truth": self.ground_truths[i], "extra": self.extras[i]}

    @classmethod
    def from_files(cls, paths: str | Path | Sequence[str | Path], tokenizer,
                   **kw) -> PromptDataset:
        """The rows of all `paths`, in order (errors name the file and its row)."""
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        if not paths:
            raise ValueError("no prompt files given: set data.train_files (or data.task)")
        parts = [cls(read_rows(p), tokenizer, source=str(p), **kw) for p in paths]
        if len(parts) == 1:
            return parts[0]
        merged = parts[0]
        merged.source = ", ".join(p.source for p in parts)
        for part in parts[1:]:
            for name in ("rows", "prompts", "ground_truths", "extras", "prompt_ids"):
                getattr(merged, name).extend(getattr(part, name))
        return merged

    @classmethod
    def from_task(cls, task, tokenizer, num: int, seed: int, split: str = "train",
                  **kw) -> PromptDataset:
        """`num` prompts of a built-in task (a name or a Task); tokenizer None means the task's."""
        from hfrl.data.tasks import get_task

        task = get_task(task)
        tokenizer = task.tokenizer() if tokenizer is None else tokenizer
        rows = task.make_prompts(num, seed, split)
        return cls(rows, tokenizer, source=f"task {task.name!r} ({split})", **kw)


def _check_row(row, i: int, key: str, source: str):
    """The row's prompt, a non-empty string or chat message list, or a ValueError saying why."""
    where = f"{source} row {i} (0-based)"
    if not isinstance(row, dict):
        raise TypeError(f"{where} is a {type(row).__name__}, expected a dict of columns")
    if key not in row:
        raise ValueError(f"{where} has no {key!r} key; its keys are {sorted(row)}: set "
                         "data.prompt_key to the prompt column, or add the key to the row")
    prompt = row[key]
    if prompt is None or (isinstance(prompt, (str, list)) and len(prompt) == 0) \
            or (isinstance(prompt, str) and not prompt.strip()):
        raise ValueError(f"{where}: {key!r} is {prompt!r}, expected a non-empty prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        for j, message in enumerate(prompt):
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), str)):
                raise ValueError(f"{where}: message {j} of the {key!r} chat is {message!r}, "
                                 'expected {"role": str, "content": str}')
        return prompt
    raise TypeError(f"{where}: {key!r} is a {type(prompt).__name__} ({prompt!r:.80}), expected "
                    'a string or a chat message list [{"role": ..., "content": ...}]')


def _truncate(ids: list[int], limit: int, truncation: str, where: str) -> list[int]:
    if truncation == "left":
        return ids[-limit:]
    if truncation == "right":
        return ids[:limit]
    raise ValueError(f"{where}: the prompt is {len(ids)} tokens, more than max_prompt_length="
                     f"{limit}: raise data.max_prompt_length, or set data.truncation to 'left' "
                     "(keep the end) or 'right' (keep the start)")


class StepSampler:
    """The rows of each training step: `indices(step)`, a pure function of (seed, step).

    Epoch e = step // steps_per_epoch visits the rows in a permutation drawn from a
    torch.Generator seeded with (seed, e) (in file order when shuffle is off). drop_last=True
    skips the rows left over after the last full batch of an epoch (different rows every epoch
    when shuffling); drop_last=False gives that epoch a last, smaller batch."""

    def __init__(self, num_rows: int, batch_size: int, seed: int, shuffle: bool = True,
                 drop_last: bool = True):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}, expected a positive number of rows "
                             "(data.train_batch_size)")
        if batch_size > num_rows:
            raise ValueError(f"batch_size={batch_size} is more than the {num_rows} prompt rows: "
                             "lower data.train_batch_size, or give more prompts")
        self.num_rows = num_rows
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.steps_per_epoch = (num_rows // batch_size if drop_last
                                else math.ceil(num_rows / batch_size))
        self._order_cache: tuple[int, list[int]] | None = None

    def epoch_order(self, epoch: int) -> list[int]:
        """All row indices in the order epoch `epoch` visits them."""
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        if self.shuffle:
            g = torch.Generator().manual_seed(_mix_seed(self.seed, epoch))
            order = torch.randperm(self.num_rows, generator=g).tolist()
        else:
            order = list(range(self.num_rows))
        self._order_cache = (epoch, order)
        return order

    def indices(self, step: int) -> list[int]:
        """The row indices of training step `step` (0-based, counted over all epochs)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step={step!r}, expected an int >= 0")
        epoch, k = divmod(step, self.steps_per_epoch)
        return self.epoch_order(epoch)[k * self.batch_size:(k + 1) * self.batch_size]

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch


def _mix_seed(seed: int, epoch: int) -> int:
    # A hash, not seed + epoch: (seed=0, epoch=1) and (seed=1, epoch=0) must not share an order.
    digest = hashlib.sha256(f"hfrl.StepSampler/{seed}/{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
