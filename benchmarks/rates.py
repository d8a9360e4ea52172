"""Store measured rates where `spear plan` reads them: the rates shipped with spear.

A benchmark that measures a figure the planner uses calls :func:`record` once per figure::

    from rates import device_name, record
    record("wavlm", rate, device=device_name(), command=" ".join(sys.argv))

Each device gets one file, ``spear/measured_rates/<device>.json`` (package data, so an
installed spear plans from them without ``--rates``; the format and names are documented in
``spear/rates.py``); a new measurement of the same name on the same device replaces the old
one. ``directory=`` writes elsewhere (test runs must, so their figures never ship).

    uv run python benchmarks/rates.py        # list what is stored
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import re
import sys
from pathlib import Path

from spear.rates import RATE_UNITS, SHIPPED_DIR, load_rates, parse_rates

RATES_DIR = SHIPPED_DIR


def device_name() -> str:
    """The CUDA device's name, or the CPU model and this process's threads."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu}, {torch.get_num_threads()} threads"


def record(
    name: str,
    value: float,
    *,
    device: str,
    command: str = "",
    unit: str | None = None,
    directory: Path = RATES_DIR,
) -> Path:
    """Add (or replace) ``name`` measured on ``device``; returns the file written."""
    entry = {
        "name": name,
        "value": float(value),
        "unit": unit or RATE_UNITS[name],
        "device": device,
        "command": command or " ".join(["python", *sys.argv]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    parse_rates([entry], "new entry")  # the same checks the planner applies
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") or "device"
    path = directory / f"{slug}.json"
    entries = json.loads(path.read_text()) if path.exists() else []
    entries = [e for e in entries if not (e["name"] == name and e["device"] == device)]
    entries.append(entry)
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(sorted(entries, key=lambda e: e["name"]), indent=1) + "\n")
    return path


def main() -> None:
    if not RATES_DIR.exists() or not any(RATES_DIR.glob("*.json")):
        print(f"no rates stored in {RATES_DIR}")
        return
    print(f"{'name':<18}{'value':>12}  {'unit':<20}{'date':<27}device")
    for r in sorted(load_rates([RATES_DIR]), key=lambda r: (r.device, r.name)):
        print(f"{r.name:<18}{r.value:>12,.1f}  {r.unit:<20}{r.date:<27}{r.device}")


if __name__ == "__main__":
    main()
