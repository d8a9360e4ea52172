"""Token shards, the product: one contract for every producer and consumer.

* :mod:`spear.shards.schema` - layout, schema, versions, :class:`TokenTeacherInfo`, frame
  formulas (what the teachers, the writer, the readers and the validator agree on).
* :mod:`spear.shards.writer` - :class:`TokenShardWriter` (a unit of tokenized items -> a
  shard's files) and :func:`index_table` / :func:`write_index`.
* :mod:`spear.shards.index` - :func:`open_run`, the one reader core: the index, every shard's
  metadata checked, one set of teachers and quantisers; :func:`list_shards`, :func:`read_table`.
* :mod:`spear.shards.dataset` - :class:`TokenShardDataset` (PyTorch, exactly once over ranks x
  workers), :func:`collate_tokens`, :func:`ray_dataset`.
* :mod:`spear.shards.checks` - :func:`validate`; :mod:`spear.shards.summary` -
  :func:`inspect`, :func:`stats`.
* :mod:`spear.testing` - a valid tokenize output built with the real writer, for tests.

Names are loaded on first use, so ``spear.shards.schema`` (imported by the teachers) pulls in
neither torch nor fsspec; mypy sees them through the ``TYPE_CHECKING`` imports, which
``tests/test_shards.py`` holds equal to the lazy table.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the same names, typed for mypy (loaded lazily at run time)
    from spear.shards.checks import (
        MAX_EXAMPLES,
        check_shard_table,
        validate,
    )
    from spear.shards.dataset import (
        ReadTask,
        TokenShardDataset,
        collate_tokens,
        plan_reads,
        ray_dataset,
    )
    from spear.shards.index import (
        ShardEntry,
        ShardError,
        TokenRun,
        list_shards,
        open_index,
        open_run,
        read_table,
        shard_teachers,
        shard_url,
        shard_urls,
        teachers_of,
    )
    from spear.shards.schema import (
        FRAME_FORMULAS,
        INDEX_FILE,
        ITEM_COLUMNS,
        NOT_RUN_FRAMES,
        PLAN_FILE,
        QUARANTINE_DIR,
        REPORT_FILE,
        SOURCE_COLUMNS,
        SUCCESS_FILE,
        TOKEN_INDEX_SCHEMA,
        TOKEN_INDEX_VERSION,
        TOKEN_SHARD_READS,
        TOKEN_SHARD_VERSION,
        TOKENS_DIR,
        TokenTeacherInfo,
        codes_from_bytes,
        codes_to_bytes,
        dasheng_num_frames,
        quarantine_path,
        read_token_teachers,
        shard_name,
        token_path,
        token_shard_metadata,
        token_shard_schema,
        wavlm_num_frames,
    )
    from spear.shards.summary import (
        Inspection,
        TeacherStats,
        TokenStats,
        inspect,
        stats,
    )
    from spear.shards.writer import (
        TokenShardWriter,
        index_table,
        write_index,
    )

_WHERE = {
    "schema": (
        "TOKEN_SHARD_VERSION TOKEN_SHARD_READS SOURCE_COLUMNS TOKEN_INDEX_VERSION "
        "TOKEN_INDEX_SCHEMA INDEX_FILE SUCCESS_FILE "
        "REPORT_FILE PLAN_FILE TOKENS_DIR QUARANTINE_DIR ITEM_COLUMNS FRAME_FORMULAS "
        "TokenTeacherInfo token_shard_schema token_shard_metadata read_token_teachers "
        "NOT_RUN_FRAMES codes_to_bytes codes_from_bytes wavlm_num_frames dasheng_num_frames "
        "shard_name "
        "token_path quarantine_path"
    ),
    "writer": "TokenShardWriter index_table write_index",
    "index": (
        "ShardError ShardEntry TokenRun open_run open_index list_shards shard_url read_table "
        "shard_teachers shard_urls teachers_of"
    ),
    "dataset": "ReadTask plan_reads TokenShardDataset collate_tokens ray_dataset",
    "checks": "validate check_shard_table MAX_EXAMPLES",
    "summary": "Inspection inspect TeacherStats TokenStats stats",
}
_MODULE_OF = {name: mod for mod, names in _WHERE.items() for name in names.split()}

__all__ = [
    "FRAME_FORMULAS",
    "INDEX_FILE",
    "ITEM_COLUMNS",
    "MAX_EXAMPLES",
    "NOT_RUN_FRAMES",
    "PLAN_FILE",
    "QUARANTINE_DIR",
    "REPORT_FILE",
    "SOURCE_COLUMNS",
    "SUCCESS_FILE",
    "TOKENS_DIR",
    "TOKEN_INDEX_SCHEMA",
    "TOKEN_INDEX_VERSION",
    "TOKEN_SHARD_READS",
    "TOKEN_SHARD_VERSION",
    "Inspection",
    "ReadTask",
    "ShardEntry",
    "ShardError",
    "TeacherStats",
    "TokenRun",
    "TokenShardDataset",
    "TokenShardWriter",
    "TokenStats",
    "TokenTeacherInfo",
    "check_shard_table",
    "codes_from_bytes",
    "codes_to_bytes",
    "collate_tokens",
    "dasheng_num_frames",
    "index_table",
    "inspect",
    "list_shards",
    "open_index",
    "open_run",
    "plan_reads",
    "quarantine_path",
    "ray_dataset",
    "read_table",
    "read_token_teachers",
    "shard_name",
    "shard_teachers",
    "shard_url",
    "shard_urls",
    "stats",
    "teachers_of",
    "token_path",
    "token_shard_metadata",
    "token_shard_schema",
    "validate",
    "wavlm_num_frames",
    "write_index",
]
"""Every name above, lazily loaded (``tests/test_shards.py`` holds it equal to ``_WHERE``)."""


def __getattr__(name: str) -> Any:
    mod = _MODULE_OF.get(name)
    if mod is None:
        raise AttributeError(f"module 'spear.shards' has no attribute {name!r}")
    return getattr(importlib.import_module(f"spear.shards.{mod}"), name)
