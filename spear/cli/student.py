"""``spear student``: work on a student: average a training run's checkpoints (icefall's
averaged model), import and export SPEAR's released transformers folders."""

from __future__ import annotations

from typing import Annotated

import typer

from spear.cli.common import ConfigOpt, EndpointOpt, SetOpt, echo, require_urls, resolve, url_option

app = typer.Typer(
    help="Work on a student: average a run, import and export SPEAR's released folders.",
    no_args_is_help=True,
)


@app.command("average")
def average(
    run: Annotated[
        str,
        typer.Argument(help="A `spear train` --out (any fsspec URL).", show_default=False),
    ],
    start: Annotated[
        int,
        typer.Option(
            help="Average the model over the steps after this one: a kept checkpoint's step, "
            "or 0 for the whole run."
        ),
    ] = 0,
    end: Annotated[
        int | None,
        typer.Option(
            help="...up to this checkpoint's step (default: the latest).", show_default=False
        ),
    ] = None,
    out: Annotated[
        str | None,
        url_option(
            "--out", "-o", help="Where the student goes; default RUN/student-avg-START-END.pt."
        ),
    ] = None,
    s3_endpoint: EndpointOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Write a student.pt averaged over a span of a training run, from the running averages
    its checkpoints keep (icefall's --use-averaged-model)."""
    from spear.errors import SpearError
    from spear.pipeline.train import average_run, save_state
    from spear.storage import check_url, join

    check_url(run)
    if start < 0:
        raise SpearError(f"--start must be >= 0, got {start}")
    cfg = resolve(config, set_, **{"storage.endpoint_url": s3_endpoint})
    storage = cfg.storage.resolved()
    state, text = average_run(run, storage, start, end)
    info = state["averaged"]
    out = out or join(run, f"student-avg-{info['from_step']}-{info['to_step']}.pt")
    check_url(out)
    save_state(state, out, storage)
    echo(f"averaged student ({text}): {out}")


@app.command("import-hf")
def import_hf(
    src: Annotated[
        str,
        typer.Argument(
            help="A SPEAR folder (config.json + model.safetensors): local path, any fsspec "
            "URL, or a hub id such as marcoyang/spear-large-speech (needs huggingface_hub)."
        ),
    ],
    out: Annotated[str, url_option("--out", "-o", help="Where to write student.pt.")] = "",
    s3_endpoint: EndpointOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """A released SPEAR encoder -> spear's student.pt (new, untrained heads: train.student.heads).

    Causal models and 25 Hz output (output_downsampling_factor 2) are refused."""
    from spear.student.model import Student

    require_urls(out=out)
    cfg = resolve(config, set_, **{"storage.endpoint_url": s3_endpoint})
    storage = cfg.storage.resolved()
    student = Student.from_hf(src, storage, heads=cfg.train.student.heads)
    student.save(out, storage)
    enc = student.encoder.cfg
    params = sum(p.numel() for n, p in student.named_parameters() if not n.startswith("heads."))
    echo(
        f"import-hf: {src} -> {out}: {sum(enc.num_layers)} layers, dim {enc.output_dim}, "
        f"{params / 1e6:.2f}M encoder parameters; heads {', '.join(student.heads)} are new"
    )


@app.command("export-hf")
def export_hf(
    checkpoint: Annotated[
        str, typer.Argument(help="A student.pt (or a training checkpoint folder holding one).")
    ],
    out: Annotated[
        str, url_option("--out", "-o", help="Folder for config.json + model.safetensors.")
    ] = "",
    code_from: Annotated[
        str | None,
        url_option(
            "--code-from",
            help="Copy SPEAR's modeling code (*.py) from this release folder or hub id, so "
            "AutoModel.from_pretrained(OUT, trust_remote_code=True) loads the export.",
            show_default=False,
        ),
    ] = None,
    s3_endpoint: EndpointOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """spear's student.pt -> SPEAR's release layout (the encoder; heads are not written)."""
    from spear.student.hf import copy_spear_code, export_spear
    from spear.student.model import Student

    require_urls(out=out)
    cfg = resolve(config, set_, **{"storage.endpoint_url": s3_endpoint})
    storage = cfg.storage.resolved()
    student = Student.from_checkpoint(checkpoint, storage)
    export_spear(student, out, storage)
    code = copy_spear_code(code_from, out, storage) if code_from else []
    echo(
        f"export-hf: {checkpoint} -> {out}: config.json, model.safetensors"
        + (f", {len(code)} modeling files from {code_from}" if code else "")
    )
