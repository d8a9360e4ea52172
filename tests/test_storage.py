"""Storage helpers on fsspec's memory filesystem and on URL errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spear.errors import StorageError
from spear.storage import (
    StorageConfig,
    canonical_url,
    check_url,
    exists,
    join,
    read_bytes,
    write_atomic,
)

MEM = StorageConfig()


def test_memory_round_trip() -> None:
    url = join("memory://spear-test", "a/b.bin")
    assert url == "memory://spear-test/a/b.bin"
    assert not exists(url, MEM)
    write_atomic(url, b"payload", MEM)
    assert exists(url, MEM) and read_bytes(url, MEM) == b"payload"
    # Two spellings of one object give one canonical URL (item ids hash it).
    assert canonical_url(url, MEM) == canonical_url("memory:///spear-test/a/b.bin", MEM)


def test_s3_options_carry_the_endpoint_explicitly() -> None:
    cfg = StorageConfig(endpoint_url="http://127.0.0.1:9", region="eu-west-1").resolved()
    opts = cfg.options_for("s3")
    assert opts["endpoint_url"] == "http://127.0.0.1:9"
    assert opts["client_kwargs"] == {"region_name": "eu-west-1"}
    assert cfg.options_for("file") == {}


@pytest.mark.parametrize("url", ["", "nosuch://x", "s3://", "s3:///"])
def test_bad_urls_fail_with_a_clear_error(url: str) -> None:
    with pytest.raises(StorageError):
        check_url(url)


def test_local_write_survives_a_concurrent_cleanup_of_an_empty_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The race CI hit: another attempt removes the shared, empty ``attempts/NAME`` folder after
    # makedirs checked it and before it created the attempt folder inside it.
    shared = tmp_path / "attempts" / "shard-00000"
    shared.mkdir(parents=True)
    target = shared / "a1" / "tokens" / "x.parquet"
    real_mkdir = os.mkdir
    fired: list[str] = []

    def mkdir_after_a_cleanup(path: str, *args: object, **kwargs: object) -> None:
        if str(path) == str(shared / "a1") and not fired:
            fired.append(str(path))
            os.rmdir(shared)  # the loser's _remove_if_empty, at the worst moment
        real_mkdir(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "mkdir", mkdir_after_a_cleanup)
    write_atomic(str(target), b"payload", MEM)
    assert fired, "the race was not staged"
    assert target.read_bytes() == b"payload"
