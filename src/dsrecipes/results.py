"""The one results writer for benchmarks: docs/results/<name>.{json,md,png}, all of the same shape.

    write_results("memory", rows, targets, plot=fn, columns=[...], notes="...")

JSON shape: {"name", "machine", "versions", "rows": [...], "targets": [{name, value, goal, met}], "notes"}.
The Markdown holds the machine, the versions, the targets table and the rows table. `plot(fig_path)` draws
the PNG with matplotlib.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import platform

PACKAGES = ("torch", "deepspeed", "accelerate", "transformers", "datasets", "bitsandbytes", "torchao")


def machine_info() -> dict:
    import psutil

    info = {
        "hostname_hidden": True,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import torch

        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        info["torch_threads"] = torch.get_num_threads()
    except Exception:  # noqa: BLE001
        pass
    return info


def versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception:  # noqa: BLE001 - a missing package is recorded, not fatal
            out[name] = None
    return out


def target(name: str, value: float, goal: str, met: bool) -> dict:
    """One target row: `goal` is human-readable (e.g. '>= 8x'); `met` is computed by the caller."""
    return {"name": name, "value": value, "goal": goal, "met": bool(met)}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "(no rows)\n"
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(out) + "\n"


def write_results(
    name: str,
    rows: list[dict],
    targets: list[dict],
    plot=None,
    columns=None,
    notes: str = "",
    out_dir: str = "docs/results",
    command: str = "",
) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    doc = {
        "name": name,
        "command": command,
        "machine": machine_info(),
        "versions": versions(),
        "rows": rows,
        "targets": targets,
        "notes": notes,
    }
    base = os.path.join(out_dir, name)
    with open(base + ".json", "w") as fh:
        json.dump(doc, fh, indent=2, default=str)
    md = [
        f"# {name}\n",
        f"Command: `{command}`\n" if command else "",
        notes + "\n" if notes else "",
        "## Targets\n",
        markdown_table(targets, ["name", "value", "goal", "met"]),
        "\n## Measurements\n",
        markdown_table(rows, columns),
        "\n## Machine and versions\n",
        markdown_table([doc["machine"]]),
        markdown_table([doc["versions"]]),
    ]
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        plot(base + ".png")
        md.insert(4, f"![{name}]({name}.png)\n\n")
    with open(base + ".md", "w") as fh:
        fh.write("\n".join(x for x in md if x))
    return doc
