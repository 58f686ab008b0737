"""`lmlab report`: one self-contained HTML page (plus report.md and results.csv) from run folders.

    build_report(["runs/study1"], "report.html")          a study folder, or run folders, in any mix
        -> {"html": Path, "markdown": Path, "csv": Path, "runs": 6}

It only reads run folders (config.yaml, run.json, metrics.jsonl, samples.jsonl, eval/*.json); see collect.py for
how wall time, GPU-hours, energy and cost are derived, analysis.py for seed groups and the power-law fit.
"""

from __future__ import annotations

from pathlib import Path

from .collect import Run, find_runs, load_run


def build_report(paths: list[str | Path], out: str | Path = "report.html", *, title: str | None = None,
                 price_per_hour: float | None = None, gpu: str | None = None, command: str = "") -> dict:
    """Write `out` (HTML), `<out stem>.md` with its images in `<out stem>_files/`, and `results.csv` beside it."""
    from . import render

    runs = [load_run(p) for p in find_runs(paths)]
    study = _study_settings(paths)
    price = price_per_hour if price_per_hour is not None else study.get("price_per_hour")
    gpu = gpu or study.get("hardware") or study.get("gpu")
    if title is None:
        title = f"lmlab report: {', '.join(Path(p).name for p in paths)}"
    report, rows = render.build(runs, title=title, price=price, gpu=gpu, command=command)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md, csv_path = out.with_suffix(".md"), out.parent / "results.csv"
    render.write_html(report, out)
    render.write_markdown(report, md)
    render.write_csv(rows, csv_path)
    return {"html": out, "markdown": md, "csv": csv_path, "runs": len(runs)}


def _study_settings(paths) -> dict:
    """Price and hardware from a study file (study.yaml / study.json) in a study folder, if any."""
    import json

    import yaml

    for p in map(Path, paths):
        for name in ("study.yaml", "study.yml", "study.json"):
            f = p / name
            if f.is_file():
                data = json.loads(f.read_text()) if f.suffix == ".json" else yaml.safe_load(f.read_text())
                if isinstance(data, dict):
                    return {k: data[k] for k in ("price_per_hour", "hardware", "gpu") if k in data}
    return {}


__all__ = ["Run", "build_report", "find_runs", "load_run"]
