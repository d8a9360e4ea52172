"""Generic checkpoint fetching: a remote folder is fetched whole, once per node, with one digest.

Fetching through a teacher (a file from S3 once, a missing file, an offline hub, a pickled
object) is tested with the teachers, in tests/stages/teachers/test_teachers.py.
"""

from __future__ import annotations


def test_remote_model_folder_is_fetched_whole_once(s3_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from spear.checkpoints import _dir_sha256, fetch_checkpoint
    from spear.storage import filesystem

    bucket = s3_server.bucket("ckpt-folder")
    fs, _ = filesystem(bucket, s3_server.storage)
    fs.pipe_file("ckpt-folder/wavlm/config.json", b'{"a": 1}')
    fs.pipe_file("ckpt-folder/wavlm/model.safetensors", b"\x00" * 1000)
    got = fetch_checkpoint(f"{bucket}/wavlm", s3_server.storage, str(tmp_path / "cache"))
    assert sorted(p.name for p in got.path.iterdir()) == ["config.json", "model.safetensors"]
    assert got.sha256 == _dir_sha256(got.path)
    fs.rm("ckpt-folder/wavlm", recursive=True)  # a second call must not fetch again
    again = fetch_checkpoint(f"{bucket}/wavlm", s3_server.storage, str(tmp_path / "cache"))
    assert again.path == got.path and again.sha256 == got.sha256
