"""Stage `render`: the Markdown table of one spec from the FID metrics its pipeline produced."""

from __future__ import annotations

from sferd.util.artifacts import atomic_write_text


def run(name: str, params: dict) -> None:
    import shutil
    from pathlib import Path

    from sferd.report.figures import fid_series, write_fid_plot, write_sample_grid
    from sferd.report.table import gather, paired_csv, render_markdown, table_context

    outs = params["outputs"]
    ctx = table_context(params["spec"], params["table"], params["rows"], params["reported"],
                        extra_metrics=params.get("extra_metrics", ()), scale=params.get("scale"))
    # figures first, the table (which links them) last
    write_fid_plot(fid_series(gather(params["rows"])), outs["plot"], outs["plot_data"], params["table"]["title"])
    grids = Path(outs["grids"])
    shutil.rmtree(grids, ignore_errors=True)  # only grids of models measured now
    shown = []
    for r in params["rows"]:
        if r.get("samples") and Path(r["samples"]).is_file() and r["row"] != "noise":
            png = grids / f"{r['name']}.png"
            write_sample_grid(r["samples"], png)
            shown.append({"label": r["label"], "steps": r["steps"], "seed": r.get("seed"), "path": png.name})
    if ctx["paired"] is not None:  # declared in dvc.yaml exactly when the spec's table asks for it (graph.py)
        atomic_write_text(outs["paired"], paired_csv(ctx["paired"]))
        ctx["paired"]["csv"] = Path(outs["paired"]).name  # beside the table: linked by file name
    ctx["figures"] = {"plot": Path(outs["plot"]).name, "grids_dir": grids.name, "grids": shown}
    atomic_write_text(outs["markdown"], render_markdown(ctx))
    print(f"{name}: wrote {params['outputs']['markdown']} ({ctx['n_cells'] - ctx['n_missing']}/{ctx['n_cells']} cells)")
