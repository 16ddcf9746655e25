"""Dataset formats, loading and checks.

Datasets follow TRL's formats: a `prompt` column (text, or a list of chat messages) and, for off-policy training, a
completion column (text, or a list of assistant messages): TRL's "prompt-completion" format. Local `.jsonl`/`.json`
files, `save_to_disk` folders and hub names all load through `load_prompt_dataset`.
"""

import json
import os

from datasets import Dataset, load_dataset, load_from_disk
from datasets.exceptions import DatasetGenerationError


def load_prompt_dataset(name_or_path: str, split: str = "train", config: str | None = None,
                        field: str = "dataset_name") -> Dataset:
    """Loads a local jsonl/json/parquet file, a `save_to_disk` folder, or a hub dataset split. A file with no rows or a
    line that is not a JSON object is refused with the file and the line number; `field` names the argument."""
    if name_or_path.endswith((".jsonl", ".json")):
        if not os.path.exists(name_or_path):
            raise FileNotFoundError(f"{field}: no such file {name_or_path!r}.")
        if not _has_content(name_or_path):
            raise ValueError(f"{field}={name_or_path!r} has no rows: the file is empty. Write one JSON object per "
                             f"line, e.g. {{\"prompt\": \"...\", \"completion\": \"...\"}}.")
        # Checked before loading: Arrow's JSON reader may accept bytes that are not UTF-8 and fail only when a row
        # is read, far from the file (one extra read of the file, no parsing).
        not_utf8 = _first_non_utf8_line(name_or_path)
        if not_utf8:
            raise ValueError(f"{field}={name_or_path!r}: {not_utf8}")
        try:
            dataset = load_dataset("json", data_files=name_or_path, split="train")
        except DatasetGenerationError as exc:
            raise ValueError(f"{field}={name_or_path!r}: {_first_bad_line(name_or_path) or exc}") from exc
    elif name_or_path.endswith(".parquet"):  # e.g. a teacher cache written by `amm-trl generate --teacher_top_k`
        if not os.path.exists(name_or_path):
            raise FileNotFoundError(f"{field}: no such file {name_or_path!r}.")
        dataset = load_dataset("parquet", data_files=name_or_path, split="train")
    elif os.path.isdir(name_or_path) and os.path.exists(os.path.join(name_or_path, "dataset_info.json")):
        dataset = load_from_disk(name_or_path)
    else:
        dataset = load_dataset(name_or_path, config, split=split)
    if len(dataset) == 0:
        raise ValueError(f"{field}={name_or_path!r} (split {split!r}) has no rows.")
    return dataset


def _has_content(path: str) -> bool:
    with open(path, "rb") as f:
        return any(line.strip() for line in f)


def _first_non_utf8_line(path: str) -> str | None:
    """JSON files are UTF-8: the first line that is not, with the byte and the fix (None if all are)."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                return (f"line {number} is not UTF-8 (byte 0x{line[exc.start]:02x} at column {exc.start + 1}). "
                        f"Save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path} > fixed.jsonl`.")
    return None


def _first_bad_line(path: str) -> str | None:
    """Where a JSON-lines (or JSON) file stops being readable: line, column and a fix, or None if every line is a
    JSON object (then the rows disagree in their columns' types, which the loader's own error says)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if path.endswith(".json"):
        try:
            json.loads(text)
            return None
        except ValueError as exc:
            if text.lstrip().startswith("["):  # one JSON document, not JSON lines
                return f"not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}."
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            return (f"line {number} is not valid JSON ({exc.msg}, column {exc.colno}): {line[:80]!r}. Each line must "
                    f"be one JSON object, e.g. {{\"prompt\": \"...\"}}.")
        if not isinstance(row, dict):
            return f"line {number} is a JSON {type(row).__name__}, not an object: {line[:80]!r}."
    return None


def check_dataset(dataset, name: str, completion_column: str | None):
    """Fails early, naming the column and the fix, instead of deep inside the first training step."""
    if dataset is None:
        return
    datasets = dataset.items() if isinstance(dataset, dict) else [(name, dataset)]
    for key, ds in datasets:
        columns = ds.column_names
        if columns is None:  # an IterableDataset of unknown features: its first row tells
            first = next(iter(ds), None)
            if first is None:
                raise ValueError(f"{key} has no rows.")
            columns = list(first)
        elif hasattr(ds, "__len__") and len(ds) == 0:
            raise ValueError(f"{key} has no rows.")
        if "prompt" not in columns:
            raise ValueError(
                f"{key} has columns {columns} but no 'prompt' column. AMMTrainer reads prompts (text, or a list of "
                f"chat messages) from 'prompt': rename yours, e.g. `dataset.rename_column('instruction', 'prompt')`."
            )
        empty = _first_empty_prompt(ds)
        if empty is not None:
            raise ValueError(
                f"{key} row {empty[0]} (0-based) has an empty prompt ({empty[1]!r}): every row needs a prompt to "
                f"generate from. Remove such rows (e.g. `dataset.filter(lambda r: r['prompt'])`) or fill them in."
            )
        if completion_column is not None and completion_column not in columns:
            raise ValueError(
                f"{key} has no {completion_column!r} column, which the objective's off-policy data reads "
                f"(`off_policy_column`). Add the reference or teacher completions (e.g. with `amm-trl generate`), "
                f"set `off_policy_column` to the right column, or use `off_policy_source: teacher`."
            )


def _first_empty_prompt(dataset) -> tuple[int, object] | None:
    """(row index, value) of the first prompt that is None, blank text or an empty message list; None if there is
    none. Datasets of unknown length (streaming) are not scanned."""
    if not hasattr(dataset, "__len__"):
        return None
    for index, prompt in enumerate(dataset["prompt"]):
        if prompt is None or (isinstance(prompt, str) and not prompt.strip()) or \
                (isinstance(prompt, list) and not prompt):
            return index, prompt
    return None
