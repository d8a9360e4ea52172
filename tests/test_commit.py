"""The commit protocol: exactly one attempt of a unit wins, outputs always match its entry,
and a killed writer leaves nothing visible that :func:`recover` does not clean up."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path

import pytest

from spear.commit import ATTEMPTS, COMMITS, commit_unit, committed_names, recover
from spear.storage import StorageConfig, create_exclusive, filesystem, join, list_names, read_bytes

LOCAL = StorageConfig()


def _files(tag: str) -> dict[str, bytes]:
    return {
        "quarantine/shard-00000.parquet": f"q-{tag}".encode(),
        "tokens/shard-00000.parquet": f"tokens-{tag}".encode() * 100,
    }


def _commit(out: str, tag: str, storage: StorageConfig, conn) -> None:  # type: ignore[no-untyped-def]
    entry = commit_unit(out, "shard-00000", _files(tag), {"rows": 1, "tag": tag}, storage)
    conn.send(entry)


def _race(out: str, storage: StorageConfig, n: int = 4) -> list[dict]:
    """``n`` processes commit the same unit with different bytes at once."""
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    for i in range(n):
        a, b = ctx.Pipe()
        p = ctx.Process(target=_commit, args=(out, f"w{i}", storage, b))
        p.start()
        pipes.append(a)
        procs.append(p)
    got = [a.recv() for a in pipes]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return got


def _check_consistent(out: str, storage: StorageConfig, entries: list[dict]) -> None:
    assert len({json.dumps(e, sort_keys=True) for e in entries}) == 1, "callers saw two winners"
    winner = entries[0]
    for rel in winner["files"]:
        assert read_bytes(join(out, rel), storage) == _files(winner["tag"])[rel]
    assert committed_names(out, storage) == {"shard-00000"}
    assert list_names(join(out, ATTEMPTS), storage) == []  # losers cleaned up after themselves


def test_duplicate_attempts_local(tmp_path: Path) -> None:
    out = str(tmp_path / "o")
    entries = _race(out, LOCAL)
    _check_consistent(out, LOCAL, entries)
    assert not [p for p in Path(out).rglob(".tmp-*")]


def test_duplicate_attempts_s3(s3_server) -> None:  # type: ignore[no-untyped-def]
    out = join(s3_server.bucket("commit-race"), "o")
    entries = _race(out, s3_server.storage)
    _check_consistent(out, s3_server.storage, entries)


def test_create_exclusive_everywhere(tmp_path: Path, s3_server) -> None:  # type: ignore[no-untyped-def]
    for url, storage in (
        (str(tmp_path / "x.json"), LOCAL),
        ("memory://spear-test/x.json", LOCAL),
        (join(s3_server.bucket("excl"), "x.json"), s3_server.storage),
    ):
        assert create_exclusive(url, b"first", storage)
        assert not create_exclusive(url, b"second", storage)
        assert read_bytes(url, storage) == b"first"


def _die_at(point: str, out: str, fault_dir: str) -> None:
    os.environ["SPEAR_FAULTS"] = f"{point}:shard-00000"
    os.environ["SPEAR_FAULTS_DIR"] = fault_dir
    commit_unit(out, "shard-00000", _files("dead"), {"rows": 1, "tag": "dead"}, LOCAL)


@pytest.mark.parametrize("point", ["mid_stage", "before_commit", "before_publish"])
def test_killed_writer_then_recover(point: str, tmp_path: Path) -> None:
    out = str(tmp_path / "o")
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_die_at, args=(point, out, str(tmp_path)))
    p.start()
    p.join(60)
    assert p.exitcode == 17, "the fault did not fire"
    # Nothing partial is visible in the final folders, whatever the point of death.
    for folder in ("tokens", "quarantine"):
        d = Path(out) / folder
        assert not d.exists() or not [f for f in d.iterdir() if f.name.startswith(".tmp-")]
    done = recover(out, LOCAL, lambda n: list(_files("x")))
    if point == "before_publish":  # committed: recover publishes the staged files
        assert done == {"shard-00000"}
        assert (Path(out) / "tokens/shard-00000.parquet").read_bytes() == _files("dead")[
            "tokens/shard-00000.parquet"
        ]
    else:  # not committed: the staged files go, the unit is redone by the next run
        assert done == set()
        assert not (Path(out) / "tokens").exists()
        entry = commit_unit(out, "shard-00000", _files("new"), {"rows": 1, "tag": "new"}, LOCAL)
        _check_consistent(out, LOCAL, [entry])
    assert list_names(join(out, ATTEMPTS), LOCAL) == []


def test_lost_output_uncommits_the_unit(tmp_path: Path) -> None:
    out = str(tmp_path / "o")
    commit_unit(out, "shard-00000", _files("a"), {"rows": 1, "tag": "a"}, LOCAL)
    (Path(out) / "tokens/shard-00000.parquet").unlink()
    assert recover(out, LOCAL, lambda n: list(_files("x"))) == set()
    fs, path = filesystem(join(out, COMMITS), LOCAL)
    assert fs.ls(path) == []
