"""`spear tokenize` through the CLI on a real local Ray against the moto S3 server.

Tokens must equal, code for code, a direct single-process computation of the same items with
the same teachers and quantisers; resume must redo only missing shards; another quantiser
against the same output must be refused; files broken after the manifest end in quarantine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from spear.cli.main import run
from spear.formats.manifest import read_manifest
from spear.pipeline.quantize import save_quantizer
from spear.quantizer.mvq import Quantizer, QuantizerInfo
from spear.shards.schema import codes_from_bytes, read_token_teachers
from spear.stages.decode import DecodeConfig, decode_segment
from spear.stages.quantizers import load_quantizer
from spear.stages.teachers import TeacherConfig, load_teacher, run_teacher
from spear.stages.tokenize import TokenizeTeacherConfig
from spear.storage import StorageConfig, filesystem, join, read_bytes, write_atomic
from spear.synth import write_speech_like

pytestmark = pytest.mark.integration


def cli(*args: str) -> int:
    return run(args)


def make_quantizer(
    url: str, teacher: str, dim: int, layer: int, seed: int, storage: StorageConfig
) -> str:
    """A random (untrained) quantiser saved the way `spear quantizer train` saves one."""
    torch.manual_seed(seed)
    q = Quantizer(
        QuantizerInfo(dim=dim, num_codebooks=4, codebook_size=16, teacher=teacher, layer=layer)
    )
    with torch.no_grad():
        q.centers.normal_()
    save_quantizer(q, url, storage)
    return url


@dataclass
class Inputs:
    manifest: str
    wavlm_q: str
    dasheng_q: str
    other_q: str
    endpoint: str
    storage: StorageConfig
    broken: dict[str, str]  # url -> expected error type


@pytest.fixture(scope="module")
def inputs(ray_cluster: str, s3_server) -> Inputs:
    storage = s3_server.storage
    root = s3_server.bucket("tokenize")
    speech, audio = join(root, "c/speech"), join(root, "c/audio")
    write_speech_like(speech, 7, storage, seconds=(1, 5), seed=11)
    write_speech_like(audio, 3, storage, seconds=(6, 14), seed=12, sample_rate=44100, fmt="WAV")
    manifest = join(root, "m")
    ep = s3_server.endpoint
    assert (
        cli(
            "manifest", f"speech={speech}", f"audio={audio}", "--out", manifest, "--s3-endpoint", ep
        )
        == 0
    )
    # Break three files after the manifest listed them: the job must quarantine, not fail.
    # Rewritten (garbage, or other valid audio) is `changed`: never tokens of other audio.
    urls = sorted(
        {r["url"] for r in read_manifest(manifest, storage).to_pylist() if r["domain"] == "speech"}
    )
    write_atomic(urls[0], b"RIFF" + bytes(range(256)) * 8, storage)
    fs, path = filesystem(urls[1], storage)
    fs.rm(path)
    write_atomic(urls[2], read_bytes(urls[3], storage), storage)
    return Inputs(
        manifest=manifest,
        wavlm_q=make_quantizer(join(root, "q/wavlm"), "wavlm-tiny", 64, 2, 0, storage),
        dasheng_q=make_quantizer(join(root, "q/dasheng"), "dasheng-tiny", 64, 2, 1, storage),
        other_q=make_quantizer(join(root, "q/other"), "wavlm-tiny", 64, 2, 2, storage),
        endpoint=ep,
        storage=storage,
        broken={urls[0]: "changed", urls[1]: "io", urls[2]: "changed"},
    )


def tokenize_args(inp: Inputs, out: str, wavlm_q: str | None = None) -> list[str]:
    return [
        "tokenize",
        "--manifest",
        inp.manifest,
        "--out",
        out,
        "--random-teachers",
        "--s3-endpoint",
        inp.endpoint,
        "--wavlm",
        "wavlm-tiny",
        "--dasheng",
        "dasheng-tiny",
        "--wavlm-quantizer",
        wavlm_q or inp.wavlm_q,
        "--dasheng-quantizer",
        inp.dasheng_q,
        "--items-per-shard",
        "4",
    ]


def read_dir(url: str, storage: StorageConfig):
    fs, path = filesystem(url, storage)
    return pq.read_table(path, filesystem=fs)


def test_tokenize_matches_direct_computation(inputs: Inputs, s3_server, capsys) -> None:
    storage = inputs.storage
    out = join(s3_server.bucket("tokenize-out"), "run")
    args = tokenize_args(inputs, out)
    assert cli(*args) == 0
    # The console says once which layout runs: fused, both teachers asking the same resources.
    assert capsys.readouterr().err.count("(teachers fused, each item decoded once)") == 1

    manifest = {r["item_id"]: r for r in read_manifest(inputs.manifest, storage).to_pylist()}
    tokens = read_dir(join(out, "tokens"), storage)
    quarantine = read_dir(join(out, "quarantine"), storage)
    ids = tokens["item_id"].to_pylist() + quarantine["item_id"].to_pylist()
    assert sorted(ids) == sorted(manifest)  # every item exactly once
    bad = {r["source"]: r["error_type"] for r in quarantine.to_pylist()}
    assert {u: bad.get(u) for u in inputs.broken} == inputs.broken
    assert not set(tokens["url"].to_pylist()) & set(inputs.broken)  # the others: tokenised
    # Shards (version 2) carry the manifest's provenance for the readers that decode again.
    for row in tokens.to_pylist():
        m = manifest[row["item_id"]]
        assert row["file_version"] == m["file_version"] and row["file_version"]
        assert row["file_size"] == m["file_size"] and row["seek_offset"] == m["seek_offset"]

    teachers = {t.prefix: t for t in read_token_teachers(tokens.schema)}
    assert set(teachers) == {"wavlm", "dasheng"}
    assert teachers["dasheng"].domains == ("audio",)
    models = {
        "wavlm": load_teacher(TeacherConfig(name="wavlm-tiny")),
        "dasheng": load_teacher(TeacherConfig(name="dasheng-tiny")),
    }
    quant = {
        "wavlm": load_quantizer(inputs.wavlm_q, storage),
        "dasheng": load_quantizer(inputs.dasheng_q, storage),
    }
    for row in tokens.to_pylist():
        m = manifest[row["item_id"]]
        wave = decode_segment(m["url"], m["start"], m["duration"], DecodeConfig(), storage)
        assert row["num_samples"] == len(wave)
        for prefix in ("wavlm", "dasheng"):
            if m["domain"] not in teachers[prefix].domains:
                assert row[f"{prefix}_codes"] is None and row[f"{prefix}_frames"] is None
                continue
            (emb,) = run_teacher(models[prefix], [wave])
            want = quant[prefix].encode(torch.from_numpy(emb), 5).numpy()
            got = codes_from_bytes(row[f"{prefix}_codes"], 4)
            assert row[f"{prefix}_frames"] == len(want)
            np.testing.assert_array_equal(got, want)

    # The index lists every shard with its checksum; the report counts what happened.
    index = read_dir(join(out, "index.parquet"), storage).to_pylist()
    with_audio = []
    for e in index:
        data = read_bytes(join(out, e["path"]), storage)
        assert hashlib.sha256(data).hexdigest() == e["sha256"] and len(data) == e["bytes"]
        shard = pq.read_table(io.BytesIO(data))
        assert shard.num_rows == e["rows"]
        if "audio" in shard["domain"].to_pylist():
            with_audio.append(e["path"])
    report = json.loads(read_bytes(join(out, "report.json"), storage))
    assert report["ok"] == tokens.num_rows and sum(report["quarantined"].values()) == 3
    assert set(report["stages"]) == {"decode", "wavlm", "dasheng"}
    assert report["hours_by_domain"]["audio"] > 0

    # Resume: lost shards are redone, the others are kept, nothing is doubled. That ran fused
    # (the default: both teachers ask the same resources); the layout is a speed setting, so
    # one pool per teacher redoes these (all but shard 0, with Dasheng's audio items among
    # them), and gives the same files byte for byte: the index, with each shard's sha256, is
    # unchanged.
    lost = [e["path"] for e in index[1:]]
    assert set(lost) & set(with_audio)
    for rel in lost:
        fs, path = filesystem(join(out, rel), storage)
        fs.rm(path)
    assert cli(*args, "--set", "tokenize.fuse_teachers=false") == 0
    assert "starting (one actor pool per teacher): 1 wavlm actor, 1 dasheng actor" in (
        capsys.readouterr().err
    )
    again = read_dir(join(out, "tokens"), storage)
    assert sorted(again["item_id"].to_pylist()) == sorted(tokens["item_id"].to_pylist())
    summary = json.loads(read_bytes(join(out, "_SUCCESS.json"), storage))
    assert summary["shards_done_before"] == len(index) - len(lost)
    assert read_dir(join(out, "index.parquet"), storage).to_pylist() == index
    report = json.loads(read_bytes(join(out, "report.json"), storage))
    assert set(report["stages"]) == {"decode", "wavlm", "dasheng"}

    # Another quantiser against the same output is refused, with the reason.
    assert cli(*tokenize_args(inputs, out, wavlm_q=inputs.other_q)) == 2


def test_bad_quantizer_fails_before_ray_work(inputs: Inputs, tmp_path, capsys) -> None:
    # A Dasheng quantiser given as the WavLM one: refused at planning, one line.
    args = tokenize_args(inputs, str(tmp_path / "o"), wavlm_q=inputs.dasheng_q)
    assert cli(*args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dasheng-tiny" in err[0]
    assert not (tmp_path / "o").exists()


def test_report_timeline_covers_every_invocation(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from spear.pipeline.tokenize import PROGRESS, invocations_timeline

    def mark(t: float, shards: int) -> dict:
        return {
            "t": t,
            "items_done": 10 * shards,
            "hours_done": 0.5 * shards,
            "shards_done": shards,
            "stage_busy": {"wavlm": 2.0 * shards},
            "stage_audio_seconds": {"wavlm": 1800.0 * shards},
        }

    folder = tmp_path / PROGRESS
    folder.mkdir(parents=True)
    # A killed invocation (saved up to 2 shards), then the resumed one.
    for name, started, marks in (
        ("2026-01-01T000000+0000-a.json", "2026-01-01T00:00:00+00:00", [mark(0, 0), mark(40, 2)]),
        ("2026-01-02T000000+0000-b.json", "2026-01-02T00:00:00+00:00", [mark(0, 0), mark(30, 3)]),
    ):
        rec = {"started": started, "wall_seconds": marks[-1]["t"], "timeline": marks}
        (folder / name).write_text(json.dumps(rec | {"shards_done": marks[-1]["shards_done"]}))
    marks, runs = invocations_timeline(str(tmp_path), StorageConfig())
    assert [r["shards_done"] for r in runs] == [2, 3]
    assert [m["t"] for m in marks] == [0, 40, 40, 70]
    assert marks[-1]["shards_done"] == 5 and marks[-1]["hours_done"] == 2.5
    assert marks[-1]["stage_busy"] == {"wavlm": 10.0} and marks[-1]["invocation"] == 1


def _job(tmp_path, wavlm: dict | None = None, dasheng: dict | None = None, **cfg):  # type: ignore[no-untyped-def]
    """The job's teachers as the driver resolves them (tiny teachers, seeded quantisers)."""
    from spear.pipeline.tokenize import resolve_teachers
    from spear.stages.teachers import DashengTeacherConfig
    from spear.stages.tokenize import DashengTokenizeConfig, TokenizeConfig

    storage = StorageConfig()
    qw = make_quantizer(str(tmp_path / "qw"), "wavlm-tiny", 64, 2, 0, storage)
    qd = make_quantizer(str(tmp_path / "qd"), "dasheng-tiny", 64, 2, 1, storage)
    teachers = {
        "wavlm": TeacherConfig(name="wavlm-tiny", allow_random=True, **(wavlm or {})),
        "dasheng": DashengTeacherConfig(name="dasheng-tiny", allow_random=True, **(dasheng or {})),
    }
    tok = TokenizeConfig(
        wavlm=TokenizeTeacherConfig(quantizer=qw),
        dasheng=DashengTokenizeConfig(quantizer=qd),
        **cfg,
    )
    return resolve_teachers(teachers, tok, storage), tok


def test_fused_actor_gives_the_per_teacher_pools_codes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # The actors Ray Data runs (the stages tokenize_stages builds, with the job's decode), called
    # in-process on real files: every column equal between the layouts, times aside.
    import soundfile as sf

    from spear.pipeline.job import decode_timed, pack, unit_actor, unpack
    from spear.pipeline.tokenize import tokenize_stages
    from spear.quantizer.config import QuantizerEncodeConfig

    storage = StorageConfig()
    speech = write_speech_like(str(tmp_path / "s"), 4, seconds=(1, 4), seed=3)
    audio = write_speech_like(
        str(tmp_path / "a"), 3, seconds=(3, 6), seed=4, sample_rate=44100, fmt="WAV"
    )
    (tmp_path / "bad.wav").write_bytes(b"RIFF" + bytes(range(256)) * 4)
    short = str(tmp_path / "short.wav")
    sf.write(short, np.zeros(300, np.int16), 16000)  # gives no frame of either teacher
    urls = [*speech, *audio, str(tmp_path / "bad.wav"), short]
    domains = ["speech"] * 4 + ["audio"] * 5
    durations = [float(sf.info(u).duration) if "bad" not in u else 1.0 for u in urls]
    items = {
        "item_id": np.array([f"i{k}" for k in range(len(urls))], dtype=object),
        "source": np.array(domains, dtype=object),
        "domain": np.array(domains, dtype=object),
        "url": np.array(urls, dtype=object),
        "start": np.zeros(len(urls)),
        "duration": np.array(durations),
    }
    job, tok = _job(tmp_path)

    def run_layout(fuse: bool) -> tuple[dict[str, np.ndarray], list[str]]:
        cfg = dataclasses.replace(tok, fuse_teachers=fuse)
        stages, _ = tokenize_stages(job, cfg, QuantizerEncodeConfig(), storage)
        data = pack(items)
        for st in stages:
            actor = unit_actor(st.cls)(
                st.kwargs,
                decode=decode_timed,
                decode_kwargs={"cfg": DecodeConfig(), "storage": storage},
                decodes=st.decodes,
                chunk_seconds=8.0,  # several chunks, decoded a chunk ahead
            )
            data = actor.run(data)
        return unpack(data), [st.name for st in stages]

    fused, fused_names = run_layout(True)
    pools, pool_names = run_layout(False)
    assert fused_names == ["wavlm+dasheng"] and pool_names == ["wavlm", "dasheng"]
    timed = {"decode_seconds", "wavlm_seconds", "dasheng_seconds"}
    assert set(fused) == set(pools) and timed < set(fused) and "audio" not in fused
    for key in sorted(set(fused) - timed):
        assert list(fused[key]) == list(pools[key]), key
    # What the comparison covers: codes of both teachers, a decode error, a too-short item.
    err = list(fused["error_type"])
    assert err[7] != "" and err[8] == "too_short" and err[:7] == [""] * 7
    assert all(fused["wavlm_frames"][:7] > 0) and all(fused["dasheng_frames"][4:7] > 0)
    assert all(fused["dasheng_frames"][:4] == -1) and fused["dasheng_codes"][4]


def test_fuse_teachers_rule(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from spear.errors import SpearError
    from spear.pipeline.tokenize import fuse_teachers, tokenize_stages
    from spear.quantizer.config import QuantizerEncodeConfig

    enc, storage = QuantizerEncodeConfig(), StorageConfig()
    # auto: both teachers ask the same per actor -> one pool of the larger size.
    job, tok = _job(tmp_path, wavlm={"num_actors": 3}, dasheng={"num_actors": 2})
    (st,), layout = tokenize_stages(job, tok, enc, storage)
    assert st.num_actors == 3 and st.decodes == ("speech", "audio") and "fused" in layout
    assert [k["keep_audio"] for k in st.kwargs["stages"]] == [("audio",), ()]
    # Another GPU share: auto keeps a pool per teacher, true is refused naming both.
    job, tok = _job(tmp_path, dasheng={"num_gpus": 0.5})
    assert not fuse_teachers(job, tok)
    assert [s.num_gpus for s in tokenize_stages(job, tok, enc, storage)[0]] == [1.0, 0.5]
    with pytest.raises(SpearError, match=r"num_gpus=0\.5"):
        fuse_teachers(job, dataclasses.replace(tok, fuse_teachers=True))
    # One teacher: auto has nothing to fuse; false never fuses.
    job, tok = _job(tmp_path)
    assert not fuse_teachers(job[:1], tok)
    assert not fuse_teachers(job, dataclasses.replace(tok, fuse_teachers=False))
