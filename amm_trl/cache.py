"""The offline teacher cache (`amm-trl generate --teacher_top_k K`, read with `teacher_placement: cache`).

One parquet file (zstd): the prompt rows as they were, the completion text (`output_column`), and per row
`prompt_ids`, `completion_ids` (the tokens the log-probs belong to, so nothing is re-tokenized), the teacher's top-k at
every completion token and `teacher_token_logprob` (float32, the taken token's log-prob). The top-k in one of two
codecs (`--teacher_top_k_codec`):

- `float16` (default): `teacher_topk_ids` (tokens x k; uint16 when every id fits, else uint32) and
  `teacher_topk_logprobs` (tokens x k, float16, sorted by rank); about 4 bytes per entry before compression.
- `log8`: about 2 bytes per entry. Each token's k ids sorted and stored as gaps (`teacher_topk_id_gaps`: the gaps'
  low bytes, then their high bytes, so that zstd finds the mostly-zero high bytes), their log-probs as 8-bit steps of
  1/16 nat below the token's most likely one (`teacher_topk_codes`; 255 = 255/16 nats or more below), and the exact
  covered mass (`teacher_topk_logmass`, float32). Decoded, every log-prob is within 1/32 nat of its value up to one
  shift per token that restores the covered mass exactly (an entry 16 nats or more below the top is read as 255/16
  below it); see `decode_log8`.

Written to a temporary file and renamed: a cache is whole or absent. `top_k_of(row)` reads either codec.
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


CODECS = ("float16", "log8")
LOG8_STEPS_PER_NAT = 16
FLOAT16_COLUMNS = ("teacher_topk_ids", "teacher_topk_logprobs")
LOG8_COLUMNS = ("teacher_topk_id_gaps", "teacher_topk_codes", "teacher_topk_logmass")


def encode_log8(ids, log_probs) -> dict[str, np.ndarray]:
    r"""One sequence's top-k (T x k ids and log-probs, any order) in the `log8` codec.

    .. math:: \text{code}_i = \min(255, \mathrm{round}(16 (\max_j \ell_j - \ell_i))), \qquad
              \text{logmass} = \log \textstyle\sum_i e^{\ell_i}

    in increasing id order; the ids as gaps (first id, then differences) split into byte planes, low bytes first:
    `id_gaps` is (T, planes * k) uint8 with planes = 1, 2 or 3 by the largest gap.
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(len(ids), -1)
    lp = np.asarray(log_probs, dtype=np.float64).reshape(ids.shape)
    order = np.argsort(ids, axis=1, kind="stable")
    ids, lp = np.take_along_axis(ids, order, 1), np.take_along_axis(lp, order, 1)
    gaps = np.diff(ids, axis=1, prepend=0)
    planes = max(1, (int(gaps.max(initial=0)).bit_length() + 7) // 8)
    gap_bytes = np.concatenate([(gaps >> (8 * b)) & 255 for b in range(planes)], axis=1).astype(np.uint8)
    top = lp.max(axis=1, keepdims=True) if lp.size else lp[:, :1]
    codes = np.clip(np.round((top - lp) * LOG8_STEPS_PER_NAT), 0, 255).astype(np.uint8)
    logmass = np.logaddexp.reduce(lp, axis=1) if lp.size else np.zeros(len(lp))
    return {"id_gaps": gap_bytes, "codes": codes, "logmass": logmass.astype(np.float32)}


def decode_log8(id_gaps, codes, logmass) -> tuple[np.ndarray, np.ndarray]:
    """(ids, log-probs), each (T, k), sorted by rank (most likely first), from `encode_log8`'s arrays; the log-probs
    of a token are shifted together so that their total mass is `logmass`."""
    codes = np.asarray(codes, dtype=np.float64).reshape(len(codes), -1)
    k = codes.shape[1]
    planes = np.asarray(id_gaps, dtype=np.int64).reshape(len(codes), -1, k) if k else np.zeros((len(codes), 1, 0))
    ids = np.cumsum(sum(planes[:, b] << (8 * b) for b in range(planes.shape[1])), axis=1)
    lp = -codes / LOG8_STEPS_PER_NAT
    if k:
        lp += np.asarray(logmass, dtype=np.float64)[:, None] - np.logaddexp.reduce(lp, axis=1, keepdims=True)
    rank = np.argsort(-lp, axis=1, kind="stable")
    return np.take_along_axis(ids, rank, 1), np.take_along_axis(lp, rank, 1).astype(np.float32)


def top_k_of(row: dict) -> dict[str, list]:
    """A cached row's top-k in rank order, whichever codec wrote it: {"ids", "log_probs", "token_log_prob"}."""
    if "teacher_topk_codes" in row:
        ids, log_probs = decode_log8(row["teacher_topk_id_gaps"], row["teacher_topk_codes"],
                                     row["teacher_topk_logmass"])
        ids, log_probs = ids.tolist(), log_probs.tolist()
    else:
        ids, log_probs = row["teacher_topk_ids"], row["teacher_topk_logprobs"]
    return {"ids": ids, "log_probs": log_probs, "token_log_prob": row["teacher_token_logprob"]}


def write_top_k_cache(path: str, dataset, output_column: str, completions: list, prompt_ids: list[list[int]],
                      completion_ids: list[list[int]], top_k: list[dict[str, list]], codec: str = "float16") -> dict:
    """Writes the cache atomically; returns its size per completion token and the teacher mass its top-k covers."""
    if codec not in CODECS:
        raise ValueError(f"teacher_top_k_codec {codec!r}: use one of {list(CODECS)}.")
    ids = [row["ids"] for row in top_k]
    table = dataset.with_format("arrow")[:].replace_schema_metadata(None)  # its features are re-inferred
    if output_column in table.column_names:
        table = table.drop_columns([output_column])
    columns = {
        output_column: pa.array(completions),
        "prompt_ids": pa.array(prompt_ids, type=pa.list_(pa.int32())),
        "completion_ids": pa.array(completion_ids, type=pa.list_(pa.int32())),
    }
    if codec == "float16":
        largest = max((max(t) for row in ids for t in row if t), default=0)
        id_type = np.uint16 if largest < 2 ** 16 else np.uint32
        columns["teacher_topk_ids"] = _nested(ids, id_type)
        columns["teacher_topk_logprobs"] = _nested([row["log_probs"] for row in top_k], np.float16)
    else:
        encoded = [encode_log8(row["ids"], row["log_probs"]) for row in top_k]
        columns["teacher_topk_id_gaps"] = _nested([e["id_gaps"] for e in encoded], np.uint8)
        columns["teacher_topk_codes"] = _nested([e["codes"] for e in encoded], np.uint8)
        columns["teacher_topk_logmass"] = pa.array([e["logmass"] for e in encoded], type=pa.list_(pa.float32()))
    columns["teacher_token_logprob"] = pa.array([row["token_log_prob"] for row in top_k],
                                                type=pa.list_(pa.float32()))
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
            "codec": codec, "file_bytes": os.path.getsize(path),
            "top_k_bytes_per_token": round(top_bytes / max(tokens, 1), 1),
            "covered_mass_mean": round(sum(covered) / max(len(covered), 1), 4),
            "covered_mass_min": round(min(covered, default=0.0), 4)}
