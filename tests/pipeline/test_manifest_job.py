"""The manifest job through the CLI, on a real local Ray, against local files and S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from spear.cli.main import main
from spear.formats.manifest import read_manifest
from spear.formats.quarantine import read_quarantine
from spear.storage import StorageConfig, filesystem, join
from spear.synth import write_corpus

pytestmark = pytest.mark.integration


def run_cli(*args: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    assert exit_.value.code in (0, None), f"spear {' '.join(args)} failed"


def cli_ok(*args: str) -> None:
    try:
        main(list(args))
    except SystemExit as e:
        assert e.code in (0, None), f"spear {' '.join(args)} exited {e.code}"


def _expectations(files: list) -> tuple[int, dict[str, str]]:
    good = [cf for cf in files if not cf.bad]
    n_items = sum(max(1, -(-int(cf.duration * 1000) // 30000)) for cf in good)
    return n_items, {cf.name: cf.bad for cf in files if cf.bad}


def _check_output(out: str, storage: StorageConfig, files: list) -> None:
    n_items, bad = _expectations(files)
    table = read_manifest(out, storage)
    assert table.num_rows == n_items
    assert len(set(table["item_id"].to_pylist())) == n_items
    q = read_quarantine(out, storage)
    assert {
        u.rsplit("/", 1)[1]: t
        for u, t in zip(q["source"].to_pylist(), q["error_type"].to_pylist(), strict=True)
    } == bad
    fs, path = filesystem(join(out, "_SUCCESS.json"), storage)
    summary = json.loads(fs.cat_file(path))
    assert summary["items"] == n_items and sum(summary["quarantined"].values()) == len(bad)


def test_manifest_local_then_resume(ray_cluster: str, tmp_path: Path) -> None:
    files = write_corpus(str(tmp_path / "corpus"), long_minutes=1.5)
    out = str(tmp_path / "manifest")
    args = ["manifest", str(tmp_path / "corpus"), "--out", out, "--files-per-task", "4"]
    cli_ok(*args)
    _check_output(out, StorageConfig(), files)
    first = read_manifest(out, StorageConfig()).sort_by("item_id")

    # Simulate a run killed half-way: some chunks done, no summary. A re-run finishes the rest.
    parts = sorted((tmp_path / "manifest" / "manifest").iterdir())
    assert len(parts) == 4  # 16 files, 4 per task
    for p in parts[1:3]:
        p.unlink()
    (tmp_path / "manifest" / "_SUCCESS.json").unlink()
    cli_ok(*args)
    _check_output(out, StorageConfig(), files)
    again = read_manifest(out, StorageConfig()).sort_by("item_id")
    assert again.equals(first)  # same ids, same rows: stable across runs
    summary = json.loads((tmp_path / "manifest" / "_SUCCESS.json").read_text())
    assert summary["chunks_done_before"] == 2
    # No temporary files are left visible.
    assert not [p for p in (tmp_path / "manifest").rglob(".tmp-*")]


def test_manifest_other_settings_refused(ray_cluster: str, tmp_path: Path, capsys) -> None:
    write_corpus(str(tmp_path / "c"), long_minutes=0)
    out = str(tmp_path / "m")
    cli_ok("manifest", str(tmp_path / "c"), "--out", out)
    with pytest.raises(SystemExit) as e:
        main(["manifest", str(tmp_path / "c"), "--out", out, "--speech-segment-seconds", "20"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "holds manifest outputs of another run" in err
    assert "(settings.speech_segment_seconds: 30.0 there, 20.0 now)" in err


def test_manifest_s3_domains_and_list_file(ray_cluster: str, s3_server) -> None:
    bucket = s3_server.bucket("manifest-s3")
    files = write_corpus(f"{bucket}/speech/part1", s3_server.storage, long_minutes=1)
    write_corpus(f"{bucket}/audio", s3_server.storage, long_minutes=0)
    fs, _ = filesystem(bucket, s3_server.storage)
    fs.pipe_file(
        f"{bucket}/lists/audio.txt".removeprefix("s3://"), b"../audio/pcm16_44k_stereo.flac\n"
    )
    out = f"{bucket}/out"
    cli_ok(
        "manifest",
        f"speech:libri={bucket}/speech",
        f"audio:clips={bucket}/lists/audio.txt",
        "--out",
        out,
        "--s3-endpoint",
        s3_server.endpoint,
    )
    table = read_manifest(out, s3_server.storage).to_pandas()
    good = [cf for cf in files if not cf.bad]
    speech = table[table.domain == "speech"]
    assert set(speech.source) == {"libri"} and speech.url.nunique() == len(good)
    clips = table[table.domain == "audio"]
    assert list(clips.source) == ["clips"] and clips.url.iloc[0].endswith("pcm16_44k_stereo.flac")
    # Files readable by plain pyarrow, without spear.
    fs, path = filesystem(f"{out}/manifest", s3_server.storage)
    assert pq.read_table(path, filesystem=fs).num_rows == len(table)


def test_bad_url_fails_fast_without_ray(tmp_path: Path) -> None:
    """A bad source or output URL is one line on stderr, before any cluster starts."""
    env = {**os.environ, "RAY_ADDRESS": ""}
    for args in (
        ["manifest", "nosuch://x/y", "--out", str(tmp_path / "o")],
        ["manifest", str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
        ["manifest", str(tmp_path), "--out", "nosuch://o"],
        ["manifest", str(tmp_path), "--out", str(tmp_path / "o"), "--set", "manifest.nope=1"],
    ):
        r = subprocess.run(
            [sys.executable, "-m", "spear.cli.main", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
        assert "Traceback" not in r.stderr


@pytest.mark.slow  # a fresh interpreter imports the whole CLI: ~20 s
def test_real_cli_binary_on_the_session_cluster(ray_cluster: str, tmp_path: Path) -> None:
    """The installed `spear` script, connected to the running cluster through RAY_ADDRESS."""
    write_corpus(str(tmp_path / "c"), long_minutes=0)
    out = tmp_path / "m"
    spear = Path(sys.executable).parent / "spear"
    r = subprocess.run(
        [str(spear), "manifest", str(tmp_path / "c"), "--out", str(out)],
        env={**os.environ, "RAY_ADDRESS": ray_cluster},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("manifest: 15 files -> 8 items")


def test_manifest_names_every_path_it_skips(ray_cluster: str, tmp_path: Path, capsys) -> None:
    """Folder links are followed (the first level too), loops and temporaries and other
    extensions are in the skipped table and the summary, dangling links and pipes in the
    quarantine with their reasons, odd names are items."""
    from spear.synth import encode, sine

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    wav = encode(sine(1.0, 16000, 440), 16000, "WAV", "PCM_16")
    for path in (src / "a::b#c?.wav", src / "sub" / "-d[1].wav", elsewhere / "e%20.wav"):
        path.write_bytes(wav)
    (src / "sub" / ".tmp-0-x.wav").write_bytes(wav)
    (src / "notes.txt").write_text("x")
    os.symlink(elsewhere, src / "linked")
    os.symlink(src, src / "sub" / "loop")
    os.symlink(src, src / "top-loop")
    os.symlink(tmp_path / "gone.wav", src / "dangling.wav")
    os.mkfifo(src / "pipe.wav")
    out = str(tmp_path / "m")
    cli_ok("manifest", str(src), "--out", out)
    line = capsys.readouterr().out
    table = read_manifest(out, StorageConfig())
    assert sorted(u.removeprefix(str(src) + "/") for u in table["url"].to_pylist()) == [
        "a::b#c?.wav",
        "linked/e%20.wav",
        "sub/-d[1].wav",
    ]
    assert all(v.startswith("size=") for v in table["file_version"].to_pylist())
    q = read_quarantine(out, StorageConfig())
    assert sorted(zip(q["source"].to_pylist(), q["error_type"].to_pylist(), strict=True)) == [
        (str(src / "dangling.wav"), "dangling_link"),
        (str(src / "pipe.wav"), "special_file"),
    ]
    skipped = pq.read_table(str(tmp_path / "m" / "skipped"))
    assert sorted(zip(skipped["url"].to_pylist(), skipped["reason"].to_pylist(), strict=True)) == [
        (str(src / "notes.txt"), "not_audio"),
        (str(src / "sub" / ".tmp-0-x.wav"), "spear_temporary"),
        (str(src / "sub" / "loop"), "symlink_loop"),
        (str(src / "top-loop"), "symlink_loop"),
    ]
    summary = json.loads((tmp_path / "m" / "_SUCCESS.json").read_text())
    assert summary["skipped"] == {"not_audio": 1, "spear_temporary": 1, "symlink_loop": 2}
    assert "4 paths skipped (not_audio 1, spear_temporary 1, symlink_loop 2)" in line


def test_version_1_manifests_stay_readable(tmp_path: Path) -> None:
    """A manifest written before the provenance columns reads with them null."""
    from spear.formats import MANIFEST_SCHEMA, parquet_bytes, with_metadata

    row = {
        "item_id": "x-0000",
        "source": "s",
        "domain": "speech",
        "url": "/a.wav",
        "segment": 0,
        "start": 0.0,
        "duration": 1.0,
        "file_duration": 1.0,
        "sample_rate": 16000,
        "channels": 1,
        "format": "WAV",
        "subtype": "PCM_16",
        "file_size": 44,
    }
    import pyarrow as pa

    (tmp_path / "manifest").mkdir()
    table = pa.Table.from_pylist([row], schema=with_metadata(MANIFEST_SCHEMA, "manifest", 1))
    (tmp_path / "manifest" / "part-0.parquet").write_bytes(parquet_bytes(table))
    (tmp_path / "_SUCCESS.json").write_text("{}")
    got = read_manifest(str(tmp_path), StorageConfig())
    assert got.num_rows == 1 and got["file_version"].to_pylist() == [None]
    assert got["file_size"].to_pylist() == [44]
    cols = read_manifest(str(tmp_path), StorageConfig(), columns=["item_id", "file_version"])
    assert cols.column_names == ["item_id", "file_version"]


def test_manifest_of_odd_names_on_s3(ray_cluster: str, s3_server) -> None:
    """Names fsspec reads as syntax, through the CLI on S3: items whose rows decode."""
    import numpy as np

    from spear.stages.decode import DecodeConfig, decode_batch
    from spear.synth import encode, sine

    bucket = s3_server.bucket("manifest-odd")
    names = ["a::b.wav", "c#d?e.wav", "f%2Fg[1].wav", "-h.wav", ".tmp-1-i.wav"]
    fs, _ = filesystem(bucket, s3_server.storage)
    for name in names:
        fs.pipe_file(
            f"manifest-odd/src/{name}", encode(sine(1.0, 16000, 440), 16000, "WAV", "PCM_16")
        )
    out = f"{bucket}/out"
    cli_ok("manifest", f"{bucket}/src", "--out", out, "--s3-endpoint", s3_server.endpoint)
    table = read_manifest(out, s3_server.storage)
    assert sorted(u.rsplit("/", 1)[1] for u in table["url"].to_pylist()) == sorted(names[:4])
    assert all("etag=" in v for v in table["file_version"].to_pylist())
    batch = {c: np.asarray(table[c].to_pylist(), dtype=object) for c in table.column_names}
    decoded = decode_batch(batch, DecodeConfig(), s3_server.storage)
    assert list(decoded["num_samples"]) == [16000] * 4, list(decoded["error"])
    summary = json.loads(fs.cat_file("manifest-odd/out/_SUCCESS.json"))
    assert summary["skipped"] == {"spear_temporary": 1}
