"""``spear student``: work on a trained student (``average``: icefall's averaged model)."""

from __future__ import annotations

from typing import Annotated

import typer

from spear.cli.common import ConfigOpt, EndpointOpt, SetOpt, echo, resolve, url_option

app = typer.Typer(help="Work on a trained student.", no_args_is_help=True)


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
