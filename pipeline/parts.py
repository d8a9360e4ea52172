"""Driver-side gathering of a Ray Data stream into fixed output parts, each written once.

The embed, tokenize and features jobs cut their items into fixed parts (the resume unit) and
write a part as soon as all its items have come back. Rows are keyed by item id, so a retried
task cannot double one, and late copies of a part already written are dropped.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from spear.errors import SpearError


def part_counts(table: pa.Table, column: str) -> dict[int, int]:
    """Items per part number in ``table[column]``."""
    counts = pc.value_counts(table[column])
    values, n = counts.field("values").to_pylist(), counts.field("counts").to_pylist()
    return dict(zip(values, n, strict=True))


def gather_parts(
    batches: Iterable[dict[str, Any]],
    column: str,
    expected: dict[int, int],
    write: Callable[[int, list[dict[str, Any]]], None],
    on_batch: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Call ``write(part, rows)`` once per part of ``expected`` when all its items are in.

    Raises SpearError when the stream ends with a part incomplete (every item must come back,
    with its result or with an error row)."""
    rows: dict[int, dict[str, dict[str, Any]]] = defaultdict(dict)
    written: set[int] = set()
    for batch in batches:
        if on_batch is not None:
            on_batch(batch)
        for i in range(len(batch["item_id"])):
            part = int(batch[column][i])
            if part in written:  # a late copy from a retried task: the part is committed
                continue
            rows[part][str(batch["item_id"][i])] = {k: batch[k][i] for k in batch}
            if len(rows[part]) == expected[part]:
                write(part, list(rows.pop(part).values()))
                written.add(part)
    if rows:
        raise SpearError(
            f"parts {sorted(rows)[:5]} are incomplete after the dataset finished; "
            "re-run the same command to finish them"
        )
