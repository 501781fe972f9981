"""Stage `render`: the Markdown table of one spec from the FID metrics its pipeline produced."""

from __future__ import annotations

from sferd.pipeline.artifacts import atomic_write_text


def run(name: str, params: dict) -> None:
    from sferd.report.table import render_markdown, table_context

    ctx = table_context(params["spec"], params["table"], params["rows"], params["reported"])
    atomic_write_text(params["outputs"]["markdown"], render_markdown(ctx))
    print(f"{name}: wrote {params['outputs']['markdown']} ({ctx['n_cells'] - ctx['n_missing']}/{ctx['n_cells']} cells)")
