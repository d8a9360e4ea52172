"""The dataset card of a tokenize output (``OUT/README.md``), written with the index.

Hugging Face ``datasets`` reads a folder's README front matter: its ``configs:`` list names the
data files, so ``load_dataset(OUT)`` reads exactly the indexed token shards instead of every
Parquet file it finds (the index and quarantine files have other schemas). The card also says
how to turn a teacher's ``{prefix}_codes`` bytes into ``(frames, C)`` arrays.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from spear.shards.schema import TokenTeacherInfo, read_token_teachers
from spear.storage import StorageConfig, filesystem, join, write_atomic

CARD_FILE = "README.md"


def dataset_card(index: pa.Table, teachers: list[TokenTeacherInfo]) -> str:
    """README.md text for a tokenize output with this ``index.parquet`` table."""
    paths = [str(p) for p in index.column("path").to_pylist()]
    rows = sum(int(r) for r in index.column("rows").to_pylist())
    hours = sum(float(s) for s in index.column("audio_seconds").to_pylist()) / 3600
    files = "\n".join(f"    - {p}" for p in paths) if paths else "    []"
    codebooks = ", ".join(f'"{t.prefix}": {t.num_codebooks}' for t in teachers)
    table = "\n".join(
        f"| `{t.prefix}` | {t.teacher} | {t.family} | {t.frame_rate:g} | {t.num_codebooks} | "
        f"{t.codebook_size} | {', '.join(t.domains)} | `{t.quantizer_id}` |"
        for t in teachers
    )
    return f"""---
configs:
- config_name: default
  data_files:
  - split: train
    path:
{files}
---
# MVQ teacher tokens (spear tokenize output)

{rows} items, {hours:.2f} h of audio in {len(paths)} token shards. One row per audio segment:
`item_id`, `source`, `domain` (speech | audio), `url`, `start`, `duration`, `num_samples`
(16 kHz), and per teacher `{{prefix}}_frames` and `{{prefix}}_codes` (uint8 codes, `(frames, C)`
row-major; null where the teacher did not run on the item's domain).

| prefix | teacher | family | frame rate (Hz) | codebooks C | codebook size | domains | quantizer |
|---|---|---|---|---|---|---|---|
{table}

Codes as `(frames, C)` arrays:

```python
import numpy as np
from datasets import load_dataset

ds = load_dataset("path/to/this/folder", split="train")
C = {{{codebooks}}}

def with_codes(batch):
    for prefix, c in C.items():
        batch[prefix] = [
            None if b is None else np.frombuffer(b, np.uint8).reshape(-1, c)
            for b in batch[prefix + "_codes"]
        ]
    return batch

ds = ds.with_transform(with_codes)  # ds[0][prefix]: uint8 (frames, C)
```

`index.parquet` lists the shards with their sha256; `quarantine/` the items without tokens and
why; the file layout is spear's docs/shards.md.
"""


def write_card(out: str, index: pa.Table, storage: StorageConfig) -> None:
    """Write ``OUT/README.md``; the teachers come from the first shard's metadata."""
    teachers: list[TokenTeacherInfo] = []
    if index.num_rows:
        fs, path = filesystem(join(out, str(index.column("path")[0])), storage)
        with fs.open(path, "rb") as f:
            teachers = read_token_teachers(pq.ParquetFile(f).schema_arrow)
    write_atomic(join(out, CARD_FILE), dataset_card(index, teachers).encode(), storage)
