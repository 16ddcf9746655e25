"""The offline teacher cache (`amm-trl generate --teacher_top_k K`, read with `teacher_placement: cache`).

One parquet file (zstd): the prompt rows as they were, the completion text (`output_column`), and per row
`prompt_ids`, `completion_ids` (the tokens the log-probs belong to, so nothing is re-tokenized), `teacher_topk_ids`
(tokens x k; uint16 when every id fits, else uint32), `teacher_topk_logprobs` (tokens x k, float16, sorted by rank)
and `teacher_token_logprob` (float32, the taken token's). Written to a temporary file and renamed: a cache is whole
or absent.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def _nested(rows: list[list[list[float]]], dtype) -> pa.Array:
    """list<list<dtype>> from rows of (tokens x k) values, built from flat numpy arrays."""
    flat = np.asarray([v for row in rows for token in row for v in token], dtype=dtype)
    inner_offsets = np.cumsum([0] + [len(token) for row in rows for token in row], dtype=np.int32)
    outer_offsets = np.cumsum([0] + [len(row) for row in rows], dtype=np.int32)
    inner = pa.ListArray.from_arrays(pa.array(inner_offsets), pa.array(flat))
    return pa.ListArray.from_arrays(pa.array(outer_offsets), inner)


def write_top_k_cache(path: str, dataset, output_column: str, completions: list, prompt_ids: list[list[int]],
                      completion_ids: list[list[int]], top_k: list[dict[str, list]]) -> dict:
    """Writes the cache atomically; returns its size per completion token and the teacher mass its top-k covers."""
    ids = [row["ids"] for row in top_k]
    largest = max((max(t) for row in ids for t in row if t), default=0)
    id_type = np.uint16 if largest < 2 ** 16 else np.uint32
    table = dataset.with_format("arrow")[:].replace_schema_metadata(None)  # its features are re-inferred
    if output_column in table.column_names:
        table = table.drop_columns([output_column])
    columns = {
        output_column: pa.array(completions),
        "prompt_ids": pa.array(prompt_ids, type=pa.list_(pa.int32())),
        "completion_ids": pa.array(completion_ids, type=pa.list_(pa.int32())),
        "teacher_topk_ids": _nested(ids, id_type),
        "teacher_topk_logprobs": _nested([row["log_probs"] for row in top_k], np.float16),
        "teacher_token_logprob": pa.array([row["token_log_prob"] for row in top_k], type=pa.list_(pa.float32())),
    }
    for name, column in columns.items():
        table = table.append_column(name, column)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)
    tokens = sum(len(c) for c in completion_ids)
    meta = pq.ParquetFile(path).metadata
    top_bytes = sum(meta.row_group(g).column(i).total_compressed_size for g in range(meta.num_row_groups)
                    for i in range(meta.num_columns)
                    if meta.row_group(g).column(i).path_in_schema.startswith("teacher_"))
    covered = [math.fsum(math.exp(v) for v in token) for row in top_k for token in row["log_probs"]]
    return {"rows": len(completion_ids), "tokens": tokens, "k": max((len(t) for row in ids for t in row), default=0),
            "file_bytes": os.path.getsize(path), "top_k_bytes_per_token": round(top_bytes / max(tokens, 1), 1),
            "covered_mass_mean": round(sum(covered) / max(len(covered), 1), 4),
            "covered_mass_min": round(min(covered, default=0.0), 4)}
