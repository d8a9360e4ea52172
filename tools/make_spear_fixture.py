"""Build the SPEAR parity fixture: a tiny SPEAR-layout checkpoint with random weights and the
reference's outputs on fixed audio, computed by SPEAR's own modeling code.

SPEAR's code is never copied into spear: this script reads it from a git mirror of the SPEAR
authors' fork (``marcoyang1998/icefall``, branch ``at_asr_multi_kd``,
``egs/general_audio_encoder/mtl/spear_large_speech_hf/``) into a scratch folder, builds the
model there and writes what the tests need (needs transformers and lhotse, both in the dev
group)::

    uv run python tools/make_spear_fixture.py --icefall /path/to/icefall.git \
        --out tests/student/data/spear_tiny

``--icefall`` is a clone or bare mirror (without it the fork is cloned from GitHub into the
scratch folder). The output folder holds ``config.json`` + ``model.safetensors`` exactly as a
released ``marcoyang/spear-*`` folder lays them out (weights stored as float16 to keep the
fixture small; values are float16-exact, the reference ran in float32 on those same values)
and ``reference.npz``: per item, the int16 audio, the reference's fbank, its encoder output
and every hidden state, each item computed alone (batch of one).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

BRANCH = "at_asr_multi_kd"
FOLDER = "egs/general_audio_encoder/mtl/spear_large_speech_hf"
FILES = (
    "configuration_spear.py",
    "modeling_spear.py",
    "spear_model.py",
    "spear_modules.py",
    "zipformer.py",
)
REPO_URL = "https://github.com/marcoyang1998/icefall"

# Small but exercising every part: stacks of two widths (channel truncation / zero-padding and
# the full-width output), one stack with two layers, SPEAR's kernels, pos_dim and head dims.
TINY = {
    "num_mel_bins": 128,
    "output_downsampling_factor": 1,
    "downsampling_factor": "1,2,4,8,4,2,1",
    "num_encoder_layers": "1,1,1,2,1,1,1",
    "feedforward_dim": "32,32,64,64,64,32,32",
    "encoder_dim": "16,16,32,32,32,16,16",
    "encoder_unmasked_dim": "8,8,16,16,16,8,8",
    "cnn_module_kernel": "31,31,15,15,15,31,31",
    "num_heads": "1,1,2,2,2,1,1",
    "pos_dim": 48,
    "causal": False,
    "chunk_size": 8,
    "left_context_frames": 128,
}
SECONDS = (1.0, 0.73)


def reference_sources(icefall: str | None, scratch: Path) -> Path:
    if icefall is None:
        icefall = str(scratch / "icefall.git")
        subprocess.run(
            ["git", "clone", "--bare", "--single-branch", "-b", BRANCH, REPO_URL, icefall],
            check=True,
        )
    src = scratch / "spear_hf"
    src.mkdir()
    for name in FILES:
        text = subprocess.run(
            ["git", f"--git-dir={_git_dir(icefall)}", "show", f"{BRANCH}:{FOLDER}/{name}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        (src / name).write_text(text)
    return src


def _git_dir(path: str) -> str:
    p = Path(path)
    return str(p / ".git") if (p / ".git").exists() else str(p)


def fixed_audio(seconds: float, seed: int) -> np.ndarray:
    """Chirps plus noise, int16: deterministic and not silent in any band."""
    rng = np.random.default_rng(seed)
    n = round(seconds * 16000)
    t = np.arange(n) / 16000
    x = 0.3 * np.sin(2 * np.pi * (200 + 1500 * t) * t) + 0.2 * np.sin(2 * np.pi * 3100 * t)
    x = x + 0.05 * rng.standard_normal(n)
    return np.clip(np.round(x * 12000), -32768, 32767).astype(np.int16)


def perturb(model, torch) -> None:  # type: ignore[no-untyped-def]
    """Move the parameters icefall initialises to constants off them, so a wrong mapping of any
    of them shows in the outputs; round everything to float16 (the stored precision)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bypass_scale"):
                p.copy_(0.3 + 0.6 * torch.rand(p.shape, generator=g))
            elif name.endswith(("downsample.bias", "log_scale")) or "norm.bias" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
            p.copy_(p.half().float())


def check_export(out, spear_model, arrays, torch, tmp):  # type: ignore[no-untyped-def]
    """spear's import of the fixture, exported again, loaded by SPEAR's own code
    (``from_pretrained``): its outputs must be the reference's (printed)."""
    from spear.student.hf import export_spear
    from spear.student.model import Student

    folder = tmp / "exported"
    export_spear(Student.from_hf(str(out)), str(folder))
    # SpearConfig from the exported config.json, the weights with strict key matching.
    # (transformers 5's from_pretrained builds on the meta device, where SPEAR's lhotse front
    # end cannot be constructed; this is the same load without it.)
    from safetensors.torch import load_file

    config = spear_model.config_class.from_pretrained(str(folder))
    loaded = spear_model(config)
    loaded.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    loaded.eval()
    worst = 0.0
    for i in range(len(SECONDS)):
        wav = torch.from_numpy(arrays[f"audio_{i}"].astype(np.float32) / 32768.0)[None]
        with torch.no_grad():
            res = loaded(wav, torch.tensor([wav.shape[1]]))
        diff = np.abs(res["encoder_out"][0].numpy() - arrays[f"encoder_out_{i}"])
        worst = max(worst, float(diff.max()))
    print(f"spear export of the imported fixture, run by SPEAR's code: max |diff| {worst:.3g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--icefall", help="a clone or bare mirror of marcoyang1998/icefall")
    ap.add_argument("--out", default="tests/student/data/spear_tiny")
    args = ap.parse_args()

    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = reference_sources(args.icefall, Path(tmp))
        sys.path.insert(0, str(src))
        from configuration_spear import SpearConfig  # type: ignore[import-not-found]
        from modeling_spear import SpearModel  # type: ignore[import-not-found]

        model = SpearModel(SpearConfig(**TINY))
        perturb(model, torch)
        model.eval()

        config = {
            "architectures": ["SpearModel"],
            "auto_map": {
                "AutoConfig": "configuration_spear.SpearConfig",
                "AutoModel": "modeling_spear.SpearModel",
            },
            "model_type": "spear",
            **TINY,
        }
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})

        arrays: dict[str, np.ndarray] = {}
        for i, seconds in enumerate(SECONDS):
            pcm = fixed_audio(seconds, seed=i)
            wav = torch.from_numpy(pcm.astype(np.float32) / 32768.0)[None]
            lens = torch.tensor([wav.shape[1]])
            with torch.no_grad():
                feats, _ = model.model.compute_fbank(wav, lens)
                res = model(wav, lens)
            arrays[f"audio_{i}"] = pcm
            arrays[f"fbank_{i}"] = feats[0].numpy()
            arrays[f"encoder_out_{i}"] = res["encoder_out"][0].numpy()
            hidden = res["intermediate_hidden_states"]
            for k, h in enumerate(hidden):
                arrays[f"hidden_{i}_{k}"] = h[0].numpy()
            arrays[f"num_hidden_{i}"] = np.array(len(hidden))
        np.savez_compressed(out / "reference.npz", **arrays)

        # How far SPEAR's own code moves an item's valid frames when it is batched with a
        # longer one (printed only; spear's student is tested to keep them).
        pcm = [arrays[f"audio_{i}"] for i in range(len(SECONDS))]
        lens = torch.tensor([len(p) for p in pcm])
        batch = torch.zeros(len(pcm), int(lens.max()))
        for i, p in enumerate(pcm):
            batch[i, : len(p)] = torch.from_numpy(p.astype(np.float32) / 32768.0)
        with torch.no_grad():
            res = model(batch, lens)
        for i in range(len(SECONDS)):
            n = arrays[f"encoder_out_{i}"].shape[0]
            diff = np.abs(res["encoder_out"][i, :n].numpy() - arrays[f"encoder_out_{i}"])
            print(f"reference, item {i} batched vs alone: max |diff| {diff.max():.3g}")
        check_export(out, SpearModel, arrays, torch, Path(tmp))
    n = sum(p.numel() for p in model.parameters())
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"{n} parameters, {len(SECONDS)} items, {size / 1e6:.2f} MB in {out}")


if __name__ == "__main__":
    main()
