"""No credential leaves the machine by accident: recognised by pattern (every store's keys,
tokens, passwords, signed URLs), never sent with a submitted job unless named with
``--send-env``, never printed, logged or written into a run's outputs.
"""

from __future__ import annotations

import json
import logging
import secrets
import shlex
from pathlib import Path
from typing import Any

import pytest

from spear.cli.main import run
from spear.credentials import (
    MASK,
    has_credential,
    install_log_redaction,
    is_credential_name,
    redact,
    redact_text,
)


@pytest.mark.parametrize(
    "name",
    [
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AZURE_STORAGE_ACCOUNT_KEY",
        "AZURE_STORAGE_SAS_TOKEN",
        "AZURE_CLIENT_SECRET",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "HF_TOKEN",
        "MINIO_ROOT_PASSWORD",
        "PGPASSWD",
        "OPENAI_API_KEY",
        "apiKey",
        "X-Amz-Signature",
        "sig",
        "SSH_PRIVATE",
        "HTTP_AUTH",
    ],
)
def test_credential_names_by_pattern(name: str) -> None:
    assert is_credential_name(name)


@pytest.mark.parametrize(
    "name",
    ["AWS_REGION", "AWS_ENDPOINT_URL", "tokenize", "checkpoint", "X-Amz-Date", "sv", "author"],
)
def test_other_names_are_not_credentials(name: str) -> None:
    assert not is_credential_name(name)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("https://alice:pa55w0rd@host/x.pt", "https://***@host/x.pt"),
        (
            "https://a.blob.core.windows.net/c/w.pt?sv=2022-11-02&sp=r&sig=abc%2Bdef&se=2030",
            "https://a.blob.core.windows.net/c/w.pt?sv=2022-11-02&sp=r&sig=***&se=2030",
        ),
        (
            "s3://b/k?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIA1&X-Amz-Signature=f00d&X-Amz-Date=1",
            "s3://b/k?X-Amz-Algorithm=AWS4&X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Date=1",
        ),
        ("AccountName=a;AccountKey=Zm9vYmFy==;EndpointSuffix=x", "AccountName=a;AccountKey=***;"),
        ("--env AZURE_STORAGE_ACCOUNT_KEY=xyz123", "--env AZURE_STORAGE_ACCOUNT_KEY=***"),
        ("-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----", MASK),
    ],
)
def test_credential_values_are_masked(text: str, shown: str) -> None:
    assert has_credential(text)
    assert redact_text(text, {}).startswith(shown)


@pytest.mark.parametrize(
    "text",
    [
        "s3://bucket/runs/tokens",
        "--set train.mix.token_mixing=true",
        "Set RAY_AUTH_MODE=disabled to opt out",
        "AWS_SECRET_ACCESS_KEY: credentials do not travel",
    ],
)
def test_plain_text_is_left_alone(text: str) -> None:
    assert not has_credential(text) and redact_text(text, {}) == text


def test_redact_structures_and_environment_values() -> None:
    data = {"tokenize": {"items": 3}, "password": "x", "token_mixing": False, "u": "http://a:b@h"}
    assert redact(data) == {
        "tokenize": {"items": 3},
        "password": MASK,
        "token_mixing": False,
        "u": "http://***@h",
    }
    env = {"MY_STORE_KEY": "s3cr3t-value-42", "HOME": "/root"}
    assert redact_text("failed with s3cr3t-value-42 in /root", env) == "failed with *** in /root"


def test_log_records_are_masked(caplog: pytest.LogCaptureFixture, monkeypatch: Any) -> None:
    monkeypatch.setenv("SPEAR_TEST_TOKEN", "tok-" + secrets.token_hex(8))
    install_log_redaction()
    with caplog.at_level(logging.INFO):
        logging.getLogger("spear.test").warning("fetching %s", "https://h/x.pt?sig=abcdef")
        logging.getLogger("other").info("token is %s", __import__("os").environ["SPEAR_TEST_TOKEN"])
    assert "sig=***" in caplog.text and "abcdef" not in caplog.text
    assert "token is ***" in caplog.text


def test_local_ray_gets_the_credentials_but_the_log_only_their_names(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    from spear.ray_utils import RayConfig, init_ray

    value = "key-" + secrets.token_hex(8)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", value)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    with caplog.at_level(logging.DEBUG, logger="spear"):
        init_ray(RayConfig())
    assert calls[0]["runtime_env"]["env_vars"]["AWS_SECRET_ACCESS_KEY"] == value  # on-machine
    assert "AWS_SECRET_ACCESS_KEY=***" in caplog.text and value not in caplog.text


# ---------------------------------------------------------------- spear submit


def _dry_run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[list[str], str]:
    capsys.readouterr()
    assert run(["submit", *args, "--address", "http://head:8265", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    lines = [ln for ln in out.splitlines() if not ln.startswith("#")]
    return shlex.split(lines[0]), out + err


def test_send_env_sends_a_named_credential_and_shows_it_masked(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from spear.submit import prepare_job

    shell, given = secrets.token_hex(12), secrets.token_hex(12)
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_KEY", shell)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secrets.token_hex(12))  # never named: stays
    stage = ["tokenize", "--manifest", "s3://b/m", "--out", "s3://b/t"]
    cmd, shown = _dry_run(
        [
            *stage,
            "--send-env",
            "AZURE_STORAGE_ACCOUNT_KEY",
            "--send-env",
            "HF_TOKEN",
            "--env",
            f"HF_TOKEN={given}",
        ],
        capsys,
    )
    env = json.loads(cmd[cmd.index("--runtime-env-json") + 1])["env_vars"]
    assert env["AZURE_STORAGE_ACCOUNT_KEY"] == MASK and env["HF_TOKEN"] == MASK
    assert "AWS_SECRET_ACCESS_KEY" not in env
    assert shell not in shown and given not in shown
    # What is sent is the real value, of the named variables only.
    job = prepare_job(
        "http://head:8265",
        ["tokenize"],
        stage[1:],
        url_options=(),
        file_options=(),
        send_env=["AZURE_STORAGE_ACCOUNT_KEY"],
    ).job
    assert job.runtime_env["env_vars"]["AZURE_STORAGE_ACCOUNT_KEY"] == shell
    assert "AWS_SECRET_ACCESS_KEY" not in job.runtime_env["env_vars"]


def test_forwarded_storage_setting_with_a_credential_stays_behind(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    password = secrets.token_hex(8)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://minio:{password}@minio:9000")
    cmd, shown = _dry_run(["decode", "--manifest", "s3://b/m", "--out", "s3://b/d"], capsys)
    env = json.loads(cmd[cmd.index("--runtime-env-json") + 1])["env_vars"]
    assert "AWS_ENDPOINT_URL" not in env
    assert "AWS_ENDPOINT_URL is not forwarded" in shown and password not in shown


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["--env", "AZURE_STORAGE_ACCOUNT_KEY=abc12345"], "--send-env AZURE_STORAGE_ACCOUNT_KEY"),
        (["--env", "DB_URL=postgres://u:pw123456@db/x"], "credentials do not travel"),
        (["--send-env", "NO_SUCH_TOKEN_VAR"], "no such variable"),
        (["--set", "teachers.wavlm.checkpoint=https://h/w.pt?sig=abc12345"], "holds a credential"),
    ],
)
def test_credentials_are_refused_before_sending(
    args: list[str], phrase: str, capsys: pytest.CaptureFixture[str]
) -> None:
    stage = ["tokenize", "--manifest", "s3://b/m", "--out", "s3://b/t"]
    assert run(["submit", *stage, *args, "--address", "http://head:8265", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and phrase in err, err
    assert "abc12345" not in err and "pw123456" not in err


def test_a_config_file_with_a_credential_is_not_shipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("teachers:\n  wavlm:\n    checkpoint: https://u:hunter22@h/w.pt\n")
    stage = ["embed", "--manifest", "s3://b/m", "--out", "s3://b/e", "--config", str(cfg)]
    assert run(["submit", *stage, "--address", "http://head:8265", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"config file {cfg} holds a credential" in err and "hunter22" not in err


def test_config_show_masks_credentials(capsys: pytest.CaptureFixture[str]) -> None:
    password = secrets.token_hex(8)
    assert run(["config", "show", "--set", f"storage.endpoint_url=http://u:{password}@h:9"]) == 0
    out = capsys.readouterr().out
    assert "endpoint_url: http://***@h:9" in out and password not in out


# ---------------------------------------------------------------- a real run


@pytest.mark.integration
def test_no_planted_secret_in_any_output_of_a_run(
    ray_cluster: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """manifest + tokenize through the CLI with secrets in the environment, in a --set of a
    URL that the job really uses (a quantiser "signed URL": a local folder named like one) and
    in an unused endpoint; then every byte of both outputs, the console and the log."""
    import torch

    from spear.pipeline.quantize import save_quantizer
    from spear.quantizer.mvq import Quantizer, QuantizerInfo
    from spear.storage import StorageConfig
    from spear.synth import write_speech_like

    planted = {name: secrets.token_hex(16) for name in ("env", "env2", "sig", "password")}
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_KEY", planted["env"])
    monkeypatch.setenv("SPEAR_TEST_API_TOKEN", planted["env2"])
    write_speech_like(str(tmp_path / "audio"), 3, seconds=(1, 2), seed=7)
    q = Quantizer(QuantizerInfo(dim=64, num_codebooks=2, codebook_size=16, teacher="wavlm-tiny"))
    with torch.no_grad():
        q.centers.normal_()
    signed = str(tmp_path / f"quantizer?sv=2024&sig={planted['sig']}")
    save_quantizer(q, signed, StorageConfig())
    endpoint = ["--set", f"storage.endpoint_url=http://spear:{planted['password']}@127.0.0.1:9"]
    manifest, tokens = str(tmp_path / "manifest"), str(tmp_path / "tokens")
    caplog.set_level(logging.INFO)

    assert run(["-v", "manifest", str(tmp_path / "audio"), "--out", manifest, *endpoint]) == 0
    tokenize = ["-v", "tokenize", "--manifest", manifest, "--out", tokens, "--wavlm", "wavlm-tiny"]
    tokenize.append("--random-teachers")
    tokenize += ["--set", f"tokenize.wavlm.quantizer={signed}", "--items-per-shard", "2"]
    assert run([*tokenize, *endpoint]) == 0
    assert run(["config", "show", *endpoint]) == 0
    console = capsys.readouterr()

    report = json.loads((Path(tokens) / "report.json").read_text())
    assert report["ok"] == 3
    # The signed URL was there to leak: the report records it, masked.
    assert report["config"]["tokenize"]["wavlm"]["quantizer"].endswith("&sig=***")
    files = [p for root in (manifest, tokens) for p in Path(root).rglob("*") if p.is_file()]
    assert len(files) > 10
    for name, value in planted.items():
        assert value not in console.out + console.err, name
        assert value not in caplog.text, name
        for f in files:
            assert value.encode() not in f.read_bytes(), f"{name} in {f}"
