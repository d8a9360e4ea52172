"""Storage helpers on fsspec's memory filesystem and on URL errors."""

from __future__ import annotations

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
