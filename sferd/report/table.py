"""Metrics JSON → pandas → Markdown table (DESIGN.md step 6).

Rows are models (teacher DDIM, each method), columns are step counts; calibration rows (held-out data,
noise) sit in their own block. A cell whose metrics file does not exist yet is *marked* missing, never
hidden; paper numbers appear in their own rows with their source, never mixed into ours. Metrics beyond FID
(the spec's `evaluation.metrics`: Inception Score, precision/recall) get one table each below the FID table,
built the same way; without them the output is exactly the FID table. A table with `paired_against` (several
seeds) adds each method's paired difference to that baseline, seed by seed, with a Student-t interval
(sferd.report.paired), and the render stage writes them to a CSV beside the table.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pandas as pd
from jinja2 import Environment, FileSystemLoader, StrictUndefined

import sferd
from sferd.metrics import keys
from sferd.report import markdown

MISSING = "missing"
FID = keys.FID

# metrics-file value → (table heading, what the number means, decimals)
EXTRA_VALUES = {
    keys.ISC: ("Inception Score", "higher is better; torch-fidelity's mean over splits of the feature extractor's "
               "class predictions", 2),
    keys.PRECISION: ("Precision", "higher is better; share of samples inside the k-NN balls of the reference "
                     "images' features", 3),
    keys.RECALL: ("Recall", "higher is better; share of reference images inside the k-NN balls of the samples' "
                  "features", 3),
}
# settings recorded by the FID stages next to the extra metrics, listed under the table's provenance
EXTRA_PROVENANCE = {
    keys.METRIC_ISC: [keys.ISC_SPLITS, keys.ISC_SHUFFLE_SEED],
    keys.METRIC_PRC: [keys.PRC_NEIGHBORHOOD, keys.PRC_NUM_REAL],
}


def gather(rows: list[dict[str, Any]], root: Path = Path(".")) -> pd.DataFrame:
    """One record per planned FID stage, with its metrics if they exist."""
    records = []
    for r in rows:
        path = root / r["metrics"]
        m = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        records.append({"seed": None, **r, "present": m is not None, "metrics_data": m, "fid": m["fid"] if m else None})
    return pd.DataFrame.from_records(
        records, columns=["row", "label", "steps", "seed", "metrics", "present", "metrics_data", "fid"]
    )


def format_values(values: list[float], decimals: int = 2) -> str:
    """One run: the value; several seeds: mean ± sample standard deviation (n − 1), with n."""
    if len(values) == 1:
        return f"{values[0]:.{decimals}f}"
    s = pd.Series(values, dtype=float)
    return f"{s.mean():.{decimals}f} ± {s.std(ddof=1):.{decimals}f} (n={len(values)})"


def format_fid(fids: list[float]) -> str:
    return format_values(fids, 2)


def _cell(sub: pd.DataFrame, s: int, key: str = FID, decimals: int = 2) -> str:
    """One (row, steps) cell of `key`: empty if not planned, `missing` unless every seed measured it."""
    hit = sub[sub["steps"] == s]
    if hit.empty:
        return ""  # not planned for this row
    if not hit["present"].all():  # a mean over the seeds that happen to exist would hide the missing ones
        done = int(hit["present"].sum())
        return MISSING if len(hit) == 1 else f"{MISSING} ({done}/{len(hit)} seeds)"
    values = [m.get(key) for m in hit["metrics_data"]]
    if any(v is None for v in values):  # measured before this metric was asked for: not re-run yet
        return MISSING
    return format_values([float(v) for v in values], decimals)


def _reported_cells(r: dict, steps: list[int], decimals: int = 2) -> list[str]:
    vals = {int(k): v for k, v in r["values"].items()}
    cells = []
    for s in steps:
        if s not in vals:
            cells.append("")
        else:
            cells.append(f"{vals[s]:.{decimals}f}" if vals[s] is not None else "n/t")
    return cells


def _metric_of(r: dict) -> str:
    return r.get("metric") or FID


def _git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _step_table(model_rows: pd.DataFrame, reported: list[dict], key: str, decimals: int) -> dict:
    """Our rows × step counts for one metric, and the papers' rows of that metric over the same columns."""
    steps = sorted({int(s) for s in model_rows["steps"]} | {int(k) for r in reported for k in r["values"]})
    body = []
    for row_id in dict.fromkeys(model_rows["row"]):
        sub = model_rows[model_rows["row"] == row_id]
        body.append({"label": sub.iloc[0]["label"], "cells": [_cell(sub, s, key, decimals) for s in steps]})
    paper = [{"label": r["system"], "source": r["source"], "reason": r.get("reason"),
              "cells": _reported_cells(r, steps, decimals)} for r in reported]
    return {"steps": steps, "body": body, "paper": paper}


def _extra_tables(model_rows: pd.DataFrame, calib_rows: pd.DataFrame, reported: list[dict],
                  extra_metrics: list[str]) -> tuple[list[dict], dict]:
    """One step table per value of the spec's extra metrics, plus their calibration rows (one column each)."""
    tables, columns = [], []
    for option in extra_metrics:
        for key in keys.METRIC_VALUES[option]:
            heading, note, decimals = EXTRA_VALUES[key]
            t = _step_table(model_rows, [r for r in reported if _metric_of(r) == key], key, decimals)
            tables.append({"heading": heading, "note": note, **t})
            columns.append((key, heading, decimals))
    calib = {"headings": [h for _, h, _ in columns], "rows": []}
    for _, rec in calib_rows.iterrows():
        m = rec["metrics_data"] if rec["present"] else {}
        calib["rows"].append({"label": rec["label"], "cells": [
            f"{m[k]:.{d}f}" if m.get(k) is not None else MISSING for k, _, d in columns]})
    return tables, calib


def table_context(spec_path: str, table: dict, rows: list[dict], reported: list[dict], root: Path = Path("."),
                  extra_metrics: list[str] | tuple[str, ...] = (), scale: dict | None = None) -> dict:
    """Everything the template shows. `extra_metrics`: the render params' list of metric options beyond FID
    ("isc", "prc"); reported rows of other metrics than FID appear only in those metrics' tables. `scale`: the
    render params' scale profile (name, description, set) when the spec was compiled with `--scale`."""
    df = gather(rows, root)
    model_rows = df[df["steps"].notna()]
    calib_rows = df[df["steps"].isna()]
    fid_reported = [r for r in reported if _metric_of(r) == FID]
    fid_table = _step_table(model_rows, fid_reported, FID, 2)
    steps, body, paper = fid_table["steps"], fid_table["body"], fid_table["paper"]
    comparison = _comparison(model_rows, fid_reported)
    extra, extra_calib = _extra_tables(model_rows, calib_rows, reported, list(extra_metrics))
    calib = [
        {"label": rec["label"], "fid": f"{rec['fid']:.2f}" if rec["present"] else MISSING,
         "n": rec["metrics_data"]["num_samples"] if rec["present"] else MISSING}
        for _, rec in calib_rows.iterrows()
    ]
    present = df[df["present"]]
    prov_keys = ["fid_impl", "feature_extractor", "weights_sha256", "ref", "num_samples", "seeds"]
    fid_present = present[present["steps"].notna()]
    # the feature weights' version, when the FID stages recorded one (fixed versioned weights, features.weights)
    if any(keys.WEIGHTS_VERSION in rec["metrics_data"] for _, rec in fid_present.iterrows()):
        prov_keys.insert(prov_keys.index("weights_sha256") + 1, keys.WEIGHTS_VERSION)
    prov_keys += [k for option in extra_metrics for k in EXTRA_PROVENANCE[option]]
    provenance: dict[str, list[str]] = {k: [] for k in prov_keys}
    for _, rec in present[present["steps"].notna()].iterrows():
        for k in prov_keys:
            v = str(rec["metrics_data"].get(k))
            if v not in provenance[k]:
                provenance[k].append(v)
    machines, unrecorded = _machines(present)
    baseline = table.get("paired_against")
    return {
        "paired": paired_section(model_rows, baseline) if baseline else None,
        "title": table["title"],
        "table_id": table["id"],
        "steps": steps,
        "body": body,
        "paper": paper,
        "comparison": comparison,
        "calib": calib,
        "extra": extra,
        "extra_calib": extra_calib if extra and extra_calib["rows"] else None,
        "provenance": provenance,
        "machines": machines,
        "machine_unrecorded": unrecorded,
        # a cell is one (row, steps) of the table, however many seeds it averages
        "n_missing": int((~df.groupby(["row", "steps"], dropna=False)["present"].all()).sum()),
        "n_cells": int(df.groupby(["row", "steps"], dropna=False).ngroups),
        "sferd_costs": _sferd_costs(model_rows),
        "multi_seed": bool(len(df) and df.groupby(["row", "steps"], dropna=False).size().max() > 1),
        "spec": spec_path,
        "scale": None if scale is None else {
            **scale, "set": ", ".join(f"`{k}` = {json.dumps(v, ensure_ascii=False)}" for k, v in scale["set"].items())},
        "commit": _git_commit(root),
        "version": sferd.__version__,
    }


def _by_seed(sub: pd.DataFrame, key: str = FID) -> dict[int, float | None]:
    """seed → value of one (row, steps) cell's replicates; None where not measured (yet)."""
    out: dict[int, float | None] = {}
    for _, rec in sub.iterrows():
        seed = int(rec["seed"])
        if seed in out:  # the graph plans one FID stage per (row, steps, seed)
            raise ValueError(f"row {rec['row']!r} at {rec['steps']} steps has two metrics files for seed {seed}")
        v = rec["metrics_data"].get(key) if rec["present"] else None
        out[seed] = float(v) if v is not None else None
    return out


def paired_section(model_rows: pd.DataFrame, baseline: str, key: str = FID, decimals: int = 2) -> dict:
    """The paired differences (row − baseline, same seed, same steps) of every chain row but the baseline, at each
    step count both have: for the table (formatted `rows`) and the CSV beside it (`records`).

    Chain rows are the rows with a seed (the graph gives the teacher's and calibration rows none). A pair with any
    seed not measured is `missing (k/n seeds)`, like a cell of the main table."""
    from sferd.report.paired import CONFIDENCE, paired_difference

    chains = model_rows[model_rows["seed"].notna()]
    base = chains[chains["row"] == baseline]
    base_label = base.iloc[0]["label"] if len(base) else baseline
    rows, records = [], []
    for row_id in dict.fromkeys(chains["row"]):
        if row_id == baseline:
            continue
        sub = chains[chains["row"] == row_id]
        for steps in sorted({int(s) for s in sub["steps"]} & {int(s) for s in base["steps"]}):
            d = paired_difference(_by_seed(sub[sub["steps"] == steps], key),
                                  _by_seed(base[base["steps"] == steps], key), confidence=CONFIDENCE)
            label = sub.iloc[0]["label"]
            if d.mean is None:
                status = f"{MISSING} ({d.n}/{len(d.seeds)} seeds)"
            elif d.low is None:
                status = "no interval (1 seed)"
            else:
                status = "distinguishable from 0" if d.excludes_zero else "not distinguishable from 0"
            rows.append({
                "label": label, "steps": steps,
                "mean": f"{d.mean:+.{decimals}f}" if d.mean is not None else status,
                "interval": f"[{d.low:+.{decimals}f}, {d.high:+.{decimals}f}]" if d.low is not None else "",
                "std": f"{d.std:.{decimals}f}" if d.std is not None else "",
                "n": d.n if d.mean is not None else "",
                "verdict": status if d.mean is not None else "",
            })
            records.append({
                "method": row_id, "label": label, "baseline": baseline, "steps": steps, "metric": key,
                "seeds_planned": " ".join(map(str, d.seeds)), "seeds_measured": " ".join(map(str, d.measured)),
                "differences": " ".join(f"{x:.6f}" for x in d.differences),
                "n": d.n, "mean": d.mean, "std": d.std, "t_quantile": d.t, "low": d.low, "high": d.high,
                "confidence": d.confidence,
                "excludes_zero": "" if d.excludes_zero is None else str(d.excludes_zero).lower(),
                "status": "ok" if d.low is not None else ("missing" if d.mean is None else "one seed"),
            })
    return {"baseline": baseline, "baseline_label": base_label,
            "confidence": f"{CONFIDENCE:.0%}".replace("%", " %"), "rows": rows, "records": records,
            "csv": None}  # the render stage sets the name of the CSV it writes beside the table


PAIRED_COLUMNS = ["method", "label", "baseline", "steps", "metric", "seeds_planned", "seeds_measured", "differences",
                  "n", "mean", "std", "t_quantile", "low", "high", "confidence", "excludes_zero", "status"]


def paired_csv(section: dict) -> str:
    """The paired differences as CSV (one line per method and step count; numbers to 6 decimals, empty when not
    computed): every value the table shows, plus the per-seed differences behind it."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=PAIRED_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in section["records"]:
        w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else ("" if v is None else v)) for k, v in r.items()})
    return buf.getvalue()


def _machines(present: pd.DataFrame) -> tuple[list[dict], int]:
    """The distinct machine records behind the measured metrics files (model and calibration rows), in order of
    first appearance, each with how many files it made; and how many files have none (written before machine
    provenance existed: shown as "machine not recorded", never guessed)."""
    from sferd.util.machine import KEY, describe

    lines: dict[str, int] = {}
    unrecorded = 0
    for m in present["metrics_data"]:
        rec = m.get(KEY)
        if not isinstance(rec, dict):
            unrecorded += 1
            continue
        try:
            line = describe(rec)
        except (KeyError, TypeError):  # a record from another version of the suite: show it as it is
            line = json.dumps(rec, sort_keys=True)
        lines[line] = lines.get(line, 0) + 1
    return [{"line": k, "files": v} for k, v in lines.items()], unrecorded


def _comparison(model_rows: pd.DataFrame, reported: list[dict]) -> list[dict]:
    """Reported vs reproduced, for paper rows tied to one of our methods: one line per reported number, with
    our value when every seed of that cell is measured (else `missing`), the difference ours − reported and the
    sample count ours rests on. Numbers from other FID implementations: the difference is indicative only."""
    out = []
    for r in reported:
        method = r.get("method")
        if not method:
            continue
        for k, v in sorted(((int(k), v) for k, v in r["values"].items()), key=lambda kv: kv[0]):
            if v is None:
                continue
            hit = model_rows[(model_rows["row"] == method) & (model_rows["steps"] == k)]
            ours, n = None, None
            if len(hit) and hit["present"].all():
                ours = float(hit["fid"].astype(float).mean())
                n = int(hit.iloc[0]["metrics_data"]["num_samples"])
            out.append({
                "system": r["system"], "source": r["source"], "steps": k, "reported": f"{v:.2f}",
                "ours": f"{ours:.2f}" if ours is not None else (MISSING if len(hit) else "not planned"),
                "diff": f"{ours - v:+.2f}" if ours is not None else "",
                "n": n if n is not None else "", "seeds": len(hit),
            })
    return out


def _sferd_costs(model_rows: pd.DataFrame) -> list[dict]:
    """D14: rows whose sampler runs the predictor branch and a latent prior say what that costs."""
    out = []
    for row_id in dict.fromkeys(model_rows["row"]):
        sub = model_rows[(model_rows["row"] == row_id) & model_rows["present"]]
        parts = []
        for _, rec in sub.drop_duplicates("steps").iterrows():
            m = rec["metrics_data"]
            if "nfe_with_predictor" in m:
                parts.append(f"{int(rec['steps'])} → {m['nfe_with_predictor']}")
        if parts:
            prior = sub.iloc[0]["metrics_data"].get("latent_prior_steps")
            # the label is spec text, escaped by the template; the rest is ours
            out.append({"label": sub.iloc[0]["label"],
                        "text": f"evaluations including the predictor branch by steps {', '.join(parts)}; "
                                f"plus {prior} latent-prior MLP steps per sample"})
    return out


def render_markdown(context: dict) -> str:
    env = Environment(
        loader=FileSystemLoader(Path(__file__).parent / "templates"),
        undefined=StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,  # Markdown, not HTML
        trim_blocks=True,
        lstrip_blocks=True,
    )
    # spec text (labels, titles, sources) goes through these, so none of it can split a table row or a link, or
    # open a code span or HTML element beyond its own place
    env.filters.update(prose=markdown.prose, cell=markdown.table_cell, link_text=markdown.link_text)
    return env.get_template("table.md.j2").render(**context)
