"""Token shard reader, inspector, validator and stats on small outputs built from the contract.

:func:`build_output` writes what a finished ``spear tokenize`` run leaves (token shards with
spear's metadata, quarantine files, commit entries, ``index.parquet``, ``_SUCCESS.json``) with
the real writer (:mod:`spear.testing`); other test modules import it from here.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from spear.formats import (
    SAMPLE_RATE,
    parquet_bytes,
    with_metadata,
)
from spear.shards import (
    ShardError,
    TokenShardDataset,
    check_shard_table,
    collate_tokens,
    inspect,
    list_shards,
    open_index,
    plan_reads,
    stats,
    validate,
)
from spear.shards.schema import (
    SOURCE_COLUMNS,
    TOKEN_INDEX_SCHEMA,
    TOKEN_INDEX_VERSION,
    TOKEN_SHARD_VERSION,
    TokenTeacherInfo,
    codes_to_bytes,
    dasheng_num_frames,
    token_shard_metadata,
    wavlm_num_frames,
)
from spear.storage import StorageConfig, join, read_bytes, write_atomic
from spear.testing import TokenItem, write_token_output

WAVLM = TokenTeacherInfo(
    prefix="wavlm",
    teacher="wavlm-tiny",
    family="wavlm",
    layer=2,
    frame_rate=50.0,
    num_codebooks=4,
    codebook_size=256,
    quantizer_id="q-wavlm-1",
    checkpoint_sha256=None,
    domains=("speech", "audio"),
)
DASHENG = TokenTeacherInfo(
    prefix="dasheng",
    teacher="dasheng-tiny",
    family="dasheng",
    layer=1,
    frame_rate=25.0,
    num_codebooks=2,
    codebook_size=200,
    quantizer_id="q-dasheng-1",
    checkpoint_sha256="ab" * 32,
    domains=("audio",),
)
TEACHERS = [WAVLM, DASHENG]
FORMULA = {"wavlm": wavlm_num_frames, "dasheng": dasheng_num_frames}
LOCAL = StorageConfig()


def shard_items(
    shard: int, rows: int, teachers: list[TokenTeacherInfo], seed: int = 0, url_root: str = "/data"
) -> list[TokenItem]:
    """``rows`` items of shard ``shard``: alternately speech and audio, random lengths and codes."""
    rng = np.random.default_rng([seed, shard])
    out = []
    for i in range(rows):
        domain = "speech" if i % 2 == 0 else "audio"
        n = int(rng.integers(4000, 40000))
        codes: dict[str, np.ndarray | None] = {}
        for t in teachers:
            if domain in t.domains:
                frames = FORMULA[t.family](n)
                codes[t.prefix] = rng.integers(
                    0, t.codebook_size, (frames, t.num_codebooks), dtype=np.uint8
                )
        out.append(
            TokenItem(
                item_id=f"{shard:04d}{i:04d}-0000",
                num_samples=n,
                domain=domain,
                source="libri" if domain == "speech" else "clips",
                url=f"{url_root}/{domain}/{shard}-{i}.wav",
                start=1.5 if i % 3 == 2 else 0.0,  # a later segment of its file
                codes=codes,
            )
        )
    return out


def as_row(item: TokenItem, teachers: list[TokenTeacherInfo]) -> dict[str, Any]:
    """The token shard row the writer makes of ``item``."""
    row: dict[str, Any] = {
        "item_id": item.item_id,
        "source": item.source,
        "domain": item.domain,
        "url": item.url,
        "start": item.start,
        "duration": item.num_samples / SAMPLE_RATE,
        "num_samples": item.num_samples,
    }
    for t in teachers:
        c = item.codes.get(t.prefix)
        row[f"{t.prefix}_frames"] = None if c is None else len(c)
        row[f"{t.prefix}_codes"] = None if c is None else codes_to_bytes(c)
    return row


def shard_table(shard: int, rows: list[dict], teachers: list[TokenTeacherInfo]) -> pa.Table:
    schema, _ = token_shard_metadata(teachers, shard=shard, run_id="test-run")
    return pa.Table.from_pylist(rows, schema=schema)


def write_shard(out: str, shard: int, table: pa.Table, quarantined: int) -> dict:
    """Write one token shard; its index row."""
    path = f"tokens/shard-{shard:05d}.parquet"
    data = parquet_bytes(table)
    write_atomic(join(out, path), data, LOCAL)
    return {
        "shard": shard,
        "path": path,
        "rows": table.num_rows,
        "quarantined": quarantined,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "audio_seconds": sum(table["num_samples"].to_pylist()) / SAMPLE_RATE,
    }


def write_index(out: str, entries: list[dict]) -> None:
    schema = with_metadata(TOKEN_INDEX_SCHEMA, "token_index", TOKEN_INDEX_VERSION)
    write_atomic(
        join(out, "index.parquet"),
        parquet_bytes(pa.Table.from_pylist(entries, schema=schema)),
        LOCAL,
    )


def build_output(
    out: str,
    shards: int = 3,
    rows: int = 6,
    teachers: list[TokenTeacherInfo] | None = None,
    seed: int = 0,
    url_root: str = "/data",
) -> dict[str, dict]:
    """A finished tokenize output under ``out``; the rows written, by item id. Shard 1 has two
    quarantined items."""
    teachers = TEACHERS if teachers is None else teachers
    units, written = [], {}
    for s in range(shards):
        items = shard_items(s, rows, teachers, seed, url_root)
        written.update({it.item_id: as_row(it, teachers) for it in items})
        if s == 1:
            items += [
                TokenItem(
                    f"{s:04d}q{i:03d}-0000",
                    16000,
                    url="/data/bad.flac",
                    error_type="truncated",
                    error="cut off",
                )
                for i in range(2)
            ]
        units.append(items)
    write_token_output(out, units, teachers, run_id="test-run", storage=LOCAL)
    return written


def rewrite_shard(
    out: str, shard: int, edit: Callable[[pa.Table], pa.Table], update_index: bool = True
) -> None:
    """Replace shard ``shard`` by ``edit(table)``; refresh its index row (and the plan's item
    count, as a run that made this shard would have) unless told not to."""
    path = join(out, f"tokens/shard-{shard:05d}.parquet")
    table = edit(pq.read_table(io.BytesIO(read_bytes(path, LOCAL))))
    index = open_index(out, LOCAL).to_pylist()
    for e in index:
        if e["shard"] == shard:
            new = write_shard(out, shard, table, e["quarantined"])
            if update_index:
                plan_url = join(out, "_work/plan.json")
                plan = json.loads(read_bytes(plan_url, LOCAL))
                plan["items"] += new["rows"] - e["rows"]
                write_atomic(plan_url, json.dumps(plan).encode(), LOCAL)
                e.update(new)
    write_index(out, index)


def set_column(table: pa.Table, name: str, values: list) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(i, table.schema.field(i), pa.array(values, table.schema.field(i).type))


# ---------------------------------------------------------------- index, inspect


def test_open_index_and_list_shards(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    build_output(out, shards=3, rows=4)
    assert open_index(out).num_rows == 3
    entries = list_shards(out)
    assert [e.shard for e in entries] == [0, 1, 2]
    assert entries[1].quarantined == 2 and entries[1].quarantine_path.startswith("quarantine/")


def test_open_index_of_unfinished_output_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="not a finished tokenize output"):
        open_index(str(tmp_path))


def test_inspect_output_and_shard(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    written = build_output(out, shards=2, rows=4)
    info = inspect(out)
    assert info.kind == "output" and info.finished
    assert (info.shards, info.rows, info.quarantined) == (2, 8, 2)
    assert info.version == TOKEN_SHARD_VERSION and info.metadata["run_id"] == "test-run"
    assert [t.prefix for t in info.teachers] == ["wavlm", "dasheng"]
    assert info.teachers[1].domains == ("audio",)
    seconds = sum(r["num_samples"] for r in written.values()) / SAMPLE_RATE
    assert info.audio_hours == pytest.approx(seconds / 3600)
    assert info.bytes_per_audio_second == pytest.approx(info.bytes / seconds)
    assert "dasheng: dasheng-tiny" in info.text()
    json.dumps(info.to_dict())

    one = inspect(join(out, "tokens/shard-00001.parquet"))
    assert one.kind == "shard" and one.rows == 4 and one.quarantined is None
    assert one.metadata["shard"] == 1


# ---------------------------------------------------------------- validate


def test_valid_output_has_no_problems(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    build_output(out)
    assert validate(out) == []


def _corrupt_bytes(out: str) -> None:
    path = Path(out) / "tokens/shard-00002.parquet"
    path.write_bytes(path.read_bytes() + b"x")


def _frames(t: pa.Table) -> pa.Table:
    v = t["wavlm_frames"].to_pylist()
    v[0] += 1
    return set_column(t, "wavlm_frames", v)


def _codes_out_of_range(t: pa.Table) -> pa.Table:
    v = t["dasheng_codes"].to_pylist()
    v[1] = b"\xfa" + v[1][1:]  # 250 >= K = 200
    return set_column(t, "dasheng_codes", v)


def _codes_length(t: pa.Table) -> pa.Table:
    v = t["wavlm_codes"].to_pylist()
    v[2] = v[2][:-1]
    return set_column(t, "wavlm_codes", v)


def _dasheng_on_speech(t: pa.Table) -> pa.Table:
    f, c = t["dasheng_frames"].to_pylist(), t["dasheng_codes"].to_pylist()
    f[0], c[0] = f[1], c[1]  # row 0 is speech
    return set_column(set_column(t, "dasheng_frames", f), "dasheng_codes", c)


def _null_on_audio(t: pa.Table) -> pa.Table:
    v = t["wavlm_codes"].to_pylist()
    v[1] = None
    return set_column(t, "wavlm_codes", v)


def _mixed_quantizer(t: pa.Table) -> pa.Table:
    schema, _ = token_shard_metadata(
        [WAVLM, replace(DASHENG, quantizer_id="q-dasheng-2")], shard=2, run_id="test-run"
    )
    return t.cast(schema)


def _duplicate_id(t: pa.Table) -> pa.Table:
    v = t["item_id"].to_pylist()
    v[0] = "00000000-0000"  # shard 0's first item
    return set_column(t, "item_id", v)


def _quarantined_id(t: pa.Table) -> pa.Table:
    v = t["item_id"].to_pylist()
    v[3] = "0001q001-0000"  # in shard 1's quarantine
    return set_column(t, "item_id", v)


def _old_version(t: pa.Table) -> pa.Table:
    meta = json.loads(t.schema.metadata[b"spear"])
    meta["version"] = 99
    return t.replace_schema_metadata({b"spear": json.dumps(meta).encode()})


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (_corrupt_bytes, "sha256 differs"),
        (lambda out: rewrite_shard(out, 2, _frames), "differs from the wavlm formula"),
        (lambda out: rewrite_shard(out, 2, _codes_out_of_range), ">= codebook size 200"),
        (lambda out: rewrite_shard(out, 2, _codes_length), "length is not frames x 4"),
        (lambda out: rewrite_shard(out, 2, _dasheng_on_speech), "did not run on"),
        (lambda out: rewrite_shard(out, 2, _null_on_audio), "wavlm_codes is null on 1 rows"),
        (lambda out: rewrite_shard(out, 2, _mixed_quantizer), "2 quantizer ids across shards"),
        (lambda out: rewrite_shard(out, 2, _duplicate_id), "00000000-0000 in tokens/shard-00000"),
        (lambda out: rewrite_shard(out, 2, _quarantined_id), "quarantine/shard-00001.parquet"),
        (lambda out: rewrite_shard(out, 2, _old_version), "version 99"),
        (
            lambda out: rewrite_shard(out, 2, lambda t: t.slice(1), False),
            "5 rows, the index says 6",
        ),
        (lambda out: (Path(out) / "tokens/shard-00001.parquet").unlink(), "listed in the index"),
        (lambda out: (Path(out) / "quarantine/shard-00001.parquet").unlink(), "counts 2 items"),
        (lambda out: (Path(out) / "_SUCCESS.json").unlink(), "did not finish"),
        (
            lambda out: (Path(out) / "tokens/shard-00009.parquet").write_bytes(b"x"),
            "not in the index",
        ),
    ],
    ids=[
        "sha",
        "frames",
        "code-range",
        "code-length",
        "teacher-on-other-domain",
        "null-on-own-domain",
        "quantizer-id",
        "duplicate-id",
        "tokens-and-quarantine",
        "version",
        "rows",
        "missing-shard",
        "missing-quarantine",
        "unfinished",
        "stray-file",
    ],
)
def test_validate_finds_each_corruption(tmp_path: Path, corrupt, message: str) -> None:
    out = str(tmp_path / "out")
    build_output(out)
    corrupt(out)
    problems = validate(out)
    assert problems, "corruption not found"
    assert any(message in p for p in problems), problems


def test_validate_finds_lost_and_doubled_items(tmp_path: Path) -> None:
    # A whole shard gone (index row, tokens and quarantine): the plan's count exposes it.
    out = str(tmp_path / "lost")
    build_output(out, shards=3, rows=2)
    write_atomic(join(out, "_work/plan.json"), json.dumps({"items": 3 * 2 + 2}).encode(), LOCAL)
    assert validate(out) == []
    index = [e for e in open_index(out, LOCAL).to_pylist() if e["shard"] != 2]
    write_index(out, index)
    Path(out, "tokens/shard-00002.parquet").unlink()
    problems = validate(out)
    assert any("plan has 8" in p for p in problems), problems
    # One item quarantined in two shards' quarantine files.
    out = str(tmp_path / "twice")
    build_output(out, shards=3, rows=2)
    q = pq.read_table(Path(out, "quarantine/shard-00001.parquet"))
    write_atomic(join(out, "quarantine/shard-00000.parquet"), parquet_bytes(q.slice(0, 1)), LOCAL)
    index = open_index(out, LOCAL).to_pylist()
    index[0]["quarantined"] = 1
    write_index(out, index)
    assert any("more than once" in p for p in validate(out))


def test_check_shard_table_names_the_rows(tmp_path: Path) -> None:
    table = shard_table(0, [as_row(it, TEACHERS) for it in shard_items(0, 6, TEACHERS)], TEACHERS)
    assert check_shard_table(table, TEACHERS, "s") == []
    bad = _frames(table)
    (problem,) = check_shard_table(bad, TEACHERS, "s")
    assert "00000000-0000" in problem and "on 1 rows" in problem


def _version_1(t: pa.Table) -> pa.Table:
    """A shard as spear wrote it before version 2: no source columns, version 1 metadata."""
    meta = json.loads(t.schema.metadata[b"spear"])
    t = t.drop_columns(list(SOURCE_COLUMNS))
    return t.replace_schema_metadata({b"spear": json.dumps(meta | {"version": 1}).encode()})


def test_version_1_shards_still_validate_and_read(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    written = build_output(out, shards=2, rows=3)
    assert set(SOURCE_COLUMNS) <= set(pq.read_schema(f"{out}/tokens/shard-00000.parquet").names)
    rewrite_shard(out, 0, _version_1)
    assert "file_version" not in pq.read_schema(f"{out}/tokens/shard-00000.parquet").names
    assert validate(out) == []
    assert sorted(i["item_id"] for i in TokenShardDataset(out)) == sorted(written)


def test_an_empty_shard_is_valid_and_readable(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    written = build_output(out, shards=3, rows=2)
    rewrite_shard(out, 1, lambda t: t.slice(0, 0))
    assert validate(out) == []
    left = {k for k in written if not k.startswith("0001")}
    assert sorted(i["item_id"] for i in TokenShardDataset(out)) == sorted(left)
    assert stats(out).items == len(left)


# ---------------------------------------------------------------- stats


def test_stats_histograms_entropy_and_hours(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    written = build_output(out, shards=2, rows=6)
    s = stats(out)
    w = s.teachers["wavlm"]
    frames = [np.frombuffer(r["wavlm_codes"], np.uint8).reshape(-1, 4) for r in written.values()]
    all_frames = np.concatenate(frames)
    assert w.items == 12 and w.frames == len(all_frames)
    assert w.counts.shape == (4, 256)
    np.testing.assert_array_equal(w.counts[3], np.bincount(all_frames[:, 3], minlength=256))
    assert (w.entropy_bits <= 8).all() and (w.entropy_bits > 5).all()
    np.testing.assert_allclose(w.perplexity, 2**w.entropy_bits)
    assert (w.dead == (w.counts == 0).sum(axis=1)).all()
    d = s.teachers["dasheng"]
    assert d.items == 6 and d.counts.shape == (2, 200)
    speech = sum(r["num_samples"] for r in written.values() if r["domain"] == "speech")
    assert s.seconds_by_domain["speech"] == pytest.approx(speech / SAMPLE_RATE)
    assert s.seconds_by_source["libri"] == pytest.approx(speech / SAMPLE_RATE)
    assert "perplexity" in s.table()
    json.dumps(s.to_dict())


def test_entropy_of_a_uniform_codebook_is_log2_k() -> None:
    from spear.shards import TeacherStats

    t = TeacherStats("p", "t", 2, 4, counts=np.array([[5, 5, 5, 5], [10, 0, 0, 0]]))
    np.testing.assert_allclose(t.entropy_bits, [2.0, 0.0])
    np.testing.assert_allclose(t.perplexity, [4.0, 1.0])
    assert t.dead.tolist() == [0, 3]


# ---------------------------------------------------------------- the PyTorch reader


def _ids(ds: TokenShardDataset, workers: int) -> list[str]:
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
    return [item["item_id"] for item in loader]


@pytest.mark.parametrize(("shards", "rows"), [(4, 3), (5, 3), (3, 5), (1, 7), (2, 1)])
def test_every_row_once_across_2_ranks_x_2_workers(tmp_path: Path, shards: int, rows: int) -> None:
    """Plans are pure: 2 ranks x 2 workers, whole shards or (fewer shards) row slices."""
    out = str(tmp_path / "out")
    written = build_output(out, shards=shards, rows=rows)
    entries = list_shards(out)
    seen: list[tuple[int, int]] = []
    for reader in range(4):
        for task in plan_reads(entries, reader, 4, shuffle=True, seed=3, epoch=1):
            seen += [(task.shard, r) for r in range(task.start, task.stop)]
    assert sorted(seen) == [(s, r) for s in range(shards) for r in range(rows)]
    assert len(written) == shards * rows


@pytest.mark.parametrize("shards", [5, 3])
def test_dataloader_reads_every_item_once_2_ranks_2_workers(tmp_path: Path, shards: int) -> None:
    out = str(tmp_path / "out")
    written = build_output(out, shards=shards, rows=3)
    ids: list[str] = []
    for rank in range(2):
        ds = TokenShardDataset(out, rank=rank, world_size=2, shuffle=True, seed=1)
        ids += _ids(ds, workers=2)
    assert sorted(ids) == sorted(written)


def test_ranks_come_from_torch_distributed_when_initialised(tmp_path: Path, monkeypatch) -> None:
    out = str(tmp_path / "out")
    written = build_output(out, shards=3, rows=2)
    ids: list[str] = []
    for rank in range(2):
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.distributed, "get_rank", lambda r=rank: r)
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
        ds = TokenShardDataset(out)
        assert ds.reader() == (rank, 2)
        ids += [i["item_id"] for i in ds]
    assert sorted(ids) == sorted(written)


def test_items_carry_codes_and_none_where_a_teacher_did_not_run(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    written = build_output(out, shards=2, rows=4)
    items = list(TokenShardDataset(out))
    assert [i["item_id"] for i in items] == sorted(written)  # unshuffled: index order
    for item in items:
        row = written[item["item_id"]]
        for key in ("source", "domain", "url", "start", "duration", "num_samples"):
            assert item[key] == row[key]
        w = item["wavlm"]
        assert w.dtype == torch.uint8 and w.shape == (row["wavlm_frames"], 4)
        assert w.numpy().tobytes() == row["wavlm_codes"]
        if item["domain"] == "speech":
            assert item["dasheng"] is None
        else:
            assert item["dasheng"].shape == (row["dasheng_frames"], 2)
    long_items = list(TokenShardDataset(out, teachers=["dasheng"], codes_dtype=torch.long))
    assert "wavlm" not in long_items[0]
    assert next(i for i in long_items if i["dasheng"] is not None)["dasheng"].dtype == torch.long
    batch = collate_tokens(items[:4])
    assert batch["wavlm"].shape[0] == 4 and batch["wavlm"].dtype == torch.long
    assert batch["dasheng_lens"][0] == 0 and (batch["dasheng"][0] == -100).all()
    assert batch["wavlm_lens"].tolist() == [written[i]["wavlm_frames"] for i in batch["item_id"]]


def test_shuffle_is_seeded_per_epoch(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    build_output(out, shards=4, rows=5)

    def order(seed: int, epoch: int) -> list[str]:
        ds = TokenShardDataset(out, shuffle=True, seed=seed)
        ds.set_epoch(epoch)
        return [i["item_id"] for i in ds]

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    assert sorted(order(0, 1)) == sorted(order(1, 0))


def test_unknown_teacher_is_a_clear_error(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    build_output(out, shards=1, rows=2)
    with pytest.raises(ShardError, match="not in"):
        TokenShardDataset(out, teachers=["hubert"])


# ---------------------------------------------------------------- Ray Data on S3


@pytest.mark.integration
@pytest.mark.slow  # ~35 s of Ray Data read tasks against the S3 server
def test_ray_dataset_reads_shards_from_s3(ray_cluster: str, s3_server, tmp_path: Path) -> None:
    from spear.shards import ray_dataset

    local = str(tmp_path / "out")
    written = build_output(local, shards=3, rows=4)
    out = s3_server.bucket("spear-shards") + "/run1"
    for p in sorted(Path(local).rglob("*")):
        if p.is_file():
            write_atomic(join(out, str(p.relative_to(local))), p.read_bytes(), s3_server.storage)
    assert validate(out, s3_server.storage) == []
    ds = ray_dataset(out, s3_server.storage, columns=["item_id", "wavlm_frames", "wavlm_codes"])
    rows = ds.take_all()
    assert sorted(r["item_id"] for r in rows) == sorted(written)
    for r in rows:
        assert r["wavlm_codes"] == written[r["item_id"]]["wavlm_codes"]
    ids = _ids(TokenShardDataset(out, s3_server.storage), workers=2)  # forked workers on S3
    assert sorted(ids) == sorted(written)


def test_every_re_export_is_typed_and_lazy() -> None:
    """``spear.shards`` loads its names on first use (``__getattr__``), which mypy types as
    ``Any``; the ``if TYPE_CHECKING:`` imports give mypy each name from its module. They, the
    lazy table and ``__all__`` must list the same names from the same modules, and each name
    must resolve at run time."""
    import ast

    import spear.shards as shards

    tree = ast.parse(Path(shards.__file__).read_text())
    typed: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom) and imp.module, ast.unparse(imp)
                for alias in imp.names:
                    typed[alias.asname or alias.name] = imp.module.removeprefix("spear.shards.")
    lazy = shards._MODULE_OF
    assert typed == lazy
    assert sorted(shards.__all__) == sorted(lazy) and len(set(shards.__all__)) == len(lazy)
    import importlib

    for name, mod in lazy.items():
        assert getattr(shards, name) is getattr(
            importlib.import_module(f"spear.shards.{mod}"), name
        )
