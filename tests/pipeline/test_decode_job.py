"""The decode job through the CLI on a real local Ray: local files, S3, resume, quarantine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from spear.cli.main import main
from spear.formats import SAMPLE_RATE, audio_from_bytes, read_metadata
from spear.formats.audio import read_audio_part
from spear.formats.manifest import read_manifest
from spear.storage import StorageConfig, filesystem
from spear.synth import write_corpus

pytestmark = pytest.mark.integration


def cli_ok(*args: str) -> None:
    try:
        main(list(args))
    except SystemExit as e:
        assert e.code in (0, None), f"spear {' '.join(args)} exited {e.code}"


def test_decode_job_local_resume(
    ray_cluster: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = write_corpus(str(tmp_path / "c"), long_minutes=1)
    m, out = str(tmp_path / "m"), str(tmp_path / "d")
    cli_ok("manifest", str(tmp_path / "c"), "--out", m, "--files-per-task", "3")
    # A manifest item whose file vanished after listing: decode quarantines it, the job goes on.
    (tmp_path / "c" / "pcm16_8k_mono.wav").unlink()
    cli_ok("decode", "--manifest", m, "--out", out)
    manifest = read_manifest(m, StorageConfig())
    audio = pq.read_table(tmp_path / "d" / "audio")
    quarantine = pq.read_table(tmp_path / "d" / "quarantine").to_pylist()
    assert audio.num_rows + len(quarantine) == manifest.num_rows
    assert [(q["stage"], q["error_type"]) for q in quarantine] == [("decode", "io")]
    assert read_metadata(audio.schema)["schema"] == "audio_shard"
    by_id = {r["item_id"]: r for r in manifest.to_pylist()}
    for row in audio.to_pylist():
        want = round(by_id[row["item_id"]]["duration"] * SAMPLE_RATE)
        assert abs(row["num_samples"] - want) <= 2, row["url"]
        assert len(audio_from_bytes(row["audio"])) == row["num_samples"]
    good = {cf.name for cf in files if not cf.bad} - {"pcm16_8k_mono.wav"}
    # The format's reader reads a part back (what a person or an outside tool would use).
    part = sorted((tmp_path / "d" / "audio").iterdir())[0]
    assert read_audio_part(str(part), StorageConfig()).num_rows == pq.read_table(part).num_rows
    assert {u.rsplit("/", 1)[1] for u in audio["url"].to_pylist()} == good

    # Killed half-way: two parts lost, no summary. A re-run redoes exactly those.
    parts = sorted((tmp_path / "d" / "audio").iterdir())
    for p in parts[:2]:
        p.unlink()
    (tmp_path / "d" / "_SUCCESS.json").unlink()
    cli_ok("decode", "--manifest", m, "--out", out)
    again = pq.read_table(tmp_path / "d" / "audio")
    assert sorted(again["item_id"].to_pylist()) == sorted(audio["item_id"].to_pylist())
    summary = json.loads((tmp_path / "d" / "_SUCCESS.json").read_text())
    assert summary["parts_done_before"] == len(parts) - 2
    assert summary["decoded"] == audio.num_rows and summary["quarantined"] == {"io": 1}

    # The run record keys on the manifest's content: a copy elsewhere resumes (nothing to do),
    # a changed one or other settings are refused naming what differs, before any Ray work.
    import shutil

    copy = tmp_path / "elsewhere" / "m-copy"
    shutil.copytree(tmp_path / "m", copy)
    cli_ok("decode", "--manifest", str(copy), "--out", out)
    summary = json.loads((tmp_path / "d" / "_SUCCESS.json").read_text())
    assert summary["parts_done_before"] == summary["parts"] == len(parts)

    def refused(*args: str) -> str:
        with pytest.raises(SystemExit) as e:
            main(["decode", "--out", out, *args])
        assert e.value.code == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    err = refused("--manifest", str(copy), "--resampler", "torchaudio")
    assert f"'{out}' holds decode outputs of another run" in err
    assert "(decode.resampler: 'soxr' there, 'torchaudio' now)" in err
    first = sorted((copy / "manifest").glob("*.parquet"))[0]
    t = pq.read_table(first)
    pq.write_table(t.slice(0, t.num_rows - 1), first)
    err = refused("--manifest", str(copy))
    assert "manifest content: '" in err and "items: " in err and "resampler" not in err
    assert sorted(pq.read_table(tmp_path / "d" / "audio")["item_id"].to_pylist()) == sorted(
        audio["item_id"].to_pylist()
    )


def test_decode_job_s3(ray_cluster: str, s3_server) -> None:
    bucket = s3_server.bucket("decode-job")
    write_corpus(f"{bucket}/c", s3_server.storage, long_minutes=0)
    ep = ["--s3-endpoint", s3_server.endpoint]
    cli_ok("manifest", f"{bucket}/c", "--out", f"{bucket}/m", *ep)
    cli_ok(
        "decode",
        "--manifest",
        f"{bucket}/m",
        "--out",
        f"{bucket}/d",
        "--resampler",
        "torchaudio",
        *ep,
    )
    fs, path = filesystem(f"{bucket}/d/audio", s3_server.storage)
    table = pq.read_table(path, filesystem=fs)
    row = next(r for r in table.to_pylist() if r["url"].endswith("pcm24_48k_stereo.wav"))
    x = audio_from_bytes(row["audio"]).astype(np.float64)
    spectrum = np.abs(np.fft.rfft(x))
    peak_hz = np.argmax(spectrum) * SAMPLE_RATE / len(x)
    assert abs(peak_hz - 1000.0) < 2.0  # the 1 kHz sine survives 48k -> 16k


_MEASURE = """
import json, resource, sys
from spear.pipeline.decode import _decode_part
from spear.stages.decode import DecodeConfig
from spear.storage import StorageConfig

manifest, out, part = sys.argv[1:4]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
stats = _decode_part(
    {"part": [part]}, manifest, out, DecodeConfig(io_threads=1), StorageConfig(), False, 4
)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"grew_kb": peak - base, "decoded": stats["decoded"][0]}))
"""


@pytest.mark.slow  # a manifest job on Ray first: ~60 s
def test_decode_memory_is_bounded_per_batch_not_per_part(tmp_path: Path) -> None:
    """A part of 48 items of 20 s (61 MB of int16) and one of 8: the task's peak memory grows by
    about one batch's audio (4 items, 5 MB) either way, not by the part's (no Ray: the task's
    function in a fresh interpreter each)."""
    import subprocess
    import sys

    import pyarrow as pa

    from spear.synth import write_speech_like

    write_speech_like(str(tmp_path / "c"), 48, seconds=(20, 20), seed=3)
    cli_ok("manifest", str(tmp_path / "c"), "--out", str(tmp_path / "m"))
    rows = read_manifest(str(tmp_path / "m"), StorageConfig())
    parts = tmp_path / "parts"
    parts.mkdir()
    pq.write_table(rows, parts / "big.parquet")
    pq.write_table(rows.slice(0, 8), parts / "small.parquet")
    grew = {}
    for name in ("small", "big"):
        done = subprocess.run(
            [sys.executable, "-c", _MEASURE, str(parts), str(tmp_path / name), f"{name}.parquet"],
            capture_output=True,
            text=True,
            check=True,
        )
        got = json.loads(done.stdout.strip().splitlines()[-1])
        grew[name] = got["grew_kb"] * 1024
        assert got["decoded"] == (48 if name == "big" else 8)
    audio = pq.read_table(tmp_path / "big" / "audio" / "big.parquet")
    assert audio.num_rows == 48 and isinstance(audio.schema, pa.Schema)
    part_bytes = 48 * 20 * 16_000 * 2
    # Holding the part (audio table + its Parquet bytes) would add ~2 x 61 MB.
    assert grew["big"] < grew["small"] + part_bytes / 4, grew
