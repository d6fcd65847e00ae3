"""The trace dataset, format version 1: Arrow schemas of its Parquet tables, declared once.

A trace is a directory::

    trace/
      manifest.json                  written last, atomically; lists every shard with rows and sha256
      requests.parquet               one row per request
      routing/part-00000.parquet     one row per (request, token position, MoE layer)
      loads/part-00000.parquet       optional: counts only, for sources without per-token data

Every reader checks a table against these schemas (:func:`check_schema`), so a column of the wrong
type is reported with the file that holds it rather than failing deep inside an analysis.
"""

from __future__ import annotations

import pyarrow as pa

from moeprof.errors import TraceError

FORMAT_VERSION = "1.0"
"""``major.minor``. Readers accept any minor of their major and refuse another major."""

FORMAT_MAJOR = int(FORMAT_VERSION.split(".")[0])

PHASES = ("prefill", "decode")
PHASE_TYPE = pa.dictionary(pa.int8(), pa.string())

SOURCES = ("hf", "sglang", "vllm", "megatron", "trtllm", "jsonl", "counts", "synthetic", "expert-selection")

ROUTING_DIR = "routing"
LOADS_DIR = "loads"
REQUESTS_FILE = "requests.parquet"
MANIFEST_FILE = "manifest.json"


def routing_schema(top_k: int) -> pa.Schema:
    """Schema of ``routing/*.parquet`` for a model that routes each token to ``top_k`` experts."""
    if top_k < 1:
        raise TraceError(f"top_k must be at least 1, got {top_k}")
    return pa.schema(
        [
            pa.field("request_id", pa.int64(), nullable=False),
            pa.field("step", pa.int32(), nullable=False),
            pa.field("phase", PHASE_TYPE, nullable=False),
            pa.field("pos", pa.int32(), nullable=False),
            pa.field("layer", pa.int16(), nullable=False),
            pa.field("experts", pa.list_(pa.field("item", pa.int16(), nullable=False), top_k), nullable=False),
            pa.field("weights", pa.list_(pa.field("item", pa.float32(), nullable=False), top_k), nullable=True),
            pa.field("batch_id", pa.int64(), nullable=True),
            pa.field("token_id", pa.int32(), nullable=True),
        ]
    )


REQUESTS_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.int64(), nullable=False),
        pa.field("domain", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=True),
        pa.field("prompt_tokens", pa.int32(), nullable=False),
        pa.field("decode_tokens", pa.int32(), nullable=False),
        pa.field("text_sha256", pa.string(), nullable=True),
    ]
)

ENGINE_REQUEST_ID_FIELD = pa.field("engine_request_id", pa.string(), nullable=True)
"""Optional column of ``requests.parquet``: the serving engine's own request id (a string in vLLM and
SGLang), written by live engine captures. Not part of :data:`REQUESTS_SCHEMA`, so traces without it stay
valid and readers that do not know it ignore it."""

LOADS_SCHEMA = pa.schema(
    [
        pa.field("window", pa.int64(), nullable=False),
        pa.field("phase", PHASE_TYPE, nullable=True),
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("expert", pa.int16(), nullable=False),
        pa.field("count", pa.int64(), nullable=False),
        pa.field("request_id", pa.int64(), nullable=True),
        pa.field("domain", pa.string(), nullable=True),
    ]
)


def check_schema(actual: pa.Schema, expected: pa.Schema, where: str) -> None:
    """Raise :class:`TraceError` naming ``where`` if ``actual`` lacks a column of ``expected`` or types differ.

    Nullability is not compared (Parquet does not keep it for every writer); names and types are.
    """
    for field in expected:
        idx = actual.get_field_index(field.name)
        if idx < 0:
            raise TraceError(f"{where}: column {field.name!r} is missing (expected {field.type})")
        got = actual.field(idx).type
        if not _same_type(got, field.type):
            raise TraceError(f"{where}: column {field.name!r} has type {got}, expected {field.type}")


def _same_type(got: pa.DataType, want: pa.DataType) -> bool:
    if pa.types.is_dictionary(want):
        # Parquet may hand back a dictionary with other index width, or plain strings.
        if pa.types.is_dictionary(got):
            return pa.types.is_string(got.value_type) or pa.types.is_large_string(got.value_type)
        return pa.types.is_string(got) or pa.types.is_large_string(got)
    if pa.types.is_fixed_size_list(want):
        return (
            pa.types.is_fixed_size_list(got)
            and got.list_size == want.list_size
            and got.value_type == want.value_type
        )
    if pa.types.is_string(want):
        return pa.types.is_string(got) or pa.types.is_large_string(got)
    return got == want
