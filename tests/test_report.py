"""The table renderer: one cell per (row, steps), mean ± std over seeds, missing replicates marked, D14 costs;
and the spec's `seeds` field expanding every chain (not the teacher) per seed."""

from __future__ import annotations

import re
import statistics
from pathlib import Path

from fakes import write_metrics

from sferd.pipeline.graph import build_graph
from sferd.report.table import render_markdown, table_context
from sferd.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
TABLE = {"id": "t", "title": "T"}


def _row(row, steps, seed, metrics):
    return {"row": row, "label": row.upper(), "steps": steps, "seed": seed, "metrics": metrics}


def test_seeds_average_into_one_cell_with_sample_std(tmp_path):
    fids = [3.0, 4.0, 8.0]
    rows = [_row("pd", 1, s, write_metrics(tmp_path, f"pd-{s}", fid=f, nfe=1)) for s, f in enumerate(fids)]
    rows.append(_row("pd", 2, 0, write_metrics(tmp_path, "pd2", fid=1.5, nfe=2)))
    text = render_markdown(table_context("spec.yaml", TABLE, rows, [], root=tmp_path))
    mean, std = statistics.mean(fids), statistics.stdev(fids)
    assert f"| PD | {mean:.2f} ± {std:.2f} (n=3) | 1.50 |" in text
    assert "cells measured: 2/2" in text
    assert "mean ± sample standard deviation" in text


def test_a_missing_seed_marks_the_cell_instead_of_averaging_the_rest(tmp_path):
    rows = [_row("pd", 1, 0, write_metrics(tmp_path, "a", fid=3.0, nfe=1)), _row("pd", 1, 1, "results/metrics/absent.json")]
    ctx = table_context("spec.yaml", TABLE, rows, [], root=tmp_path)
    text = render_markdown(ctx)
    assert "| PD | missing (1/2 seeds) |" in text
    assert "cells measured: 0/1" in text


def test_single_seed_tables_say_nothing_about_seeds(tmp_path):
    rows = [_row("pd", 1, 0, write_metrics(tmp_path, "a", fid=3.0, nfe=1))]
    text = render_markdown(table_context("spec.yaml", TABLE, rows, [], root=tmp_path))
    assert "| PD | 3.00 |" in text and "standard deviation" not in text


def test_sferd_rows_state_their_evaluation_counts(tmp_path):
    rows = [_row("sferd", k, 0, write_metrics(tmp_path, f"s{k}", fid=2.0, nfe=k, nfe_with_predictor=k + k - (k // 4),
                                       latent_prior_steps=100)) for k in (1, 4)]
    text = render_markdown(table_context("spec.yaml", TABLE, rows, [], root=tmp_path))
    assert "SFERD: evaluations including the predictor branch by steps 1 → 2, 4 → 7; plus 100 latent-prior" in text


def test_seeds_repeat_chains_and_sferd_stages_but_not_the_teacher(tmp_path):
    src = (ROOT / "specs/quickstart.yaml").read_text()
    spec_file = tmp_path / "q.yaml"
    spec_file.write_text(src.replace("seed: 0\n", "seed: 0\nseeds: [0, 7]\n", 1))
    one = [s.name for s in build_graph(load_spec(ROOT / "specs/quickstart.yaml"), spec_path="q.yaml")]
    stages = build_graph(load_spec(spec_file), spec_path="q.yaml")
    two = [s.name for s in stages]
    assert set(one) <= set(two)  # seed 0 keeps its names (and so its DVC cache)
    assert "digits-pd-s0008" in two and not any("-seed0000-" in n for n in two)
    extra = sorted(set(two) - set(one))
    assert extra and all("-seed0007-" in n for n in extra), extra
    assert "digits-teacher" in two and not any(n.startswith("digits-teacher-seed") for n in two)
    by = {s.name: s.params for s in stages}
    assert by["digits-pd-seed0007-s0008"]["seed"] == 7
    assert by["digits-pd-seed0007-s0008"]["teacher"]["checkpoint"] == "results/digits-teacher/model.pt"
    assert by["digits-pd-seed0007-s0004"]["teacher"]["checkpoint"] == "results/digits-pd-seed0007-s0008/model.pt"
    assert by["digits-sferd-seed0007-s0004-predictor"]["student"]["checkpoint"] == "results/digits-sferd-seed0007-s0004/model.pt"
    # every non-teacher FID row now has two replicates, both rendered into the same cell
    rows = by["quickstart-render"]["rows"]
    pd1 = [r for r in rows if r["row"] == "pd" and r["steps"] == 1]
    assert sorted(r["seed"] for r in pd1) == [0, 7]
    assert len([n for n in extra if re.fullmatch(r"digits-[a-z-]+-seed0007-s\d{4}(-fid|-predictor|-prior)?", n)]) == len(extra)


def test_duplicate_seeds_are_a_located_error(tmp_path):
    from sferd.spec.loader import SpecError

    src = (ROOT / "specs/quickstart.yaml").read_text()
    spec_file = tmp_path / "q.yaml"
    text = src.replace("seed: 0\n", "seed: 0\nseeds: [1, 1]\n", 1)
    spec_file.write_text(text)
    line = text.splitlines().index("seeds: [1, 1]") + 1
    try:
        load_spec(spec_file)
    except SpecError as e:
        err = str(e)
    else:
        raise AssertionError("duplicate seeds accepted")
    assert "seeds must be distinct" in err and f"q.yaml:{line}:8: error: seeds:" in err


def test_sample_grid_places_samples_row_major_with_gutters():
    import numpy as np

    from sferd.report.figures import MIN_GRID_PIXELS, sample_grid

    imgs = np.stack([np.full((4, 4, 1), k, np.uint8) for k in range(70)])
    g = sample_grid(imgs, side=8)
    scale = g.shape[1] // (8 * 5 + 1)
    assert g.shape[1] >= MIN_GRID_PIXELS and g.shape == (scale * 41, scale * 41, 1)
    small = g[::scale, ::scale, 0]
    assert small[1, 1] == 0 and small[1, 1 + 5] == 1 and small[1 + 5, 1] == 8 and small[1 + 35, 1 + 35] == 63
    assert small[0].max() == 0 and small[:, 5].max() == 0  # black gutters


def test_fid_series_averages_seeds_and_drops_missing(tmp_path):
    from sferd.report.figures import fid_series
    from sferd.report.table import gather

    rows = [_row("pd", 1, s, write_metrics(tmp_path, f"p{s}", fid=f, nfe=1)) for s, f in [(0, 2.0), (1, 4.0)]]
    rows.append(_row("pd", 2, 0, "results/metrics/absent.json"))
    rows.append({"row": "heldout", "label": "Held-out", "steps": None, "metrics": write_metrics(tmp_path, "h", fid=0.1)})
    series = fid_series(gather(rows, root=tmp_path))
    assert series.to_dict("records") == [{"model": "PD", "steps": 1, "fid": 3.0, "n": 2}]


def test_plot_and_grid_files_are_written(tmp_path):
    import numpy as np
    import pandas as pd

    from sferd.report.figures import write_fid_plot, write_sample_grid

    series = pd.DataFrame({"model": ["PD", "PD"], "steps": [1, 2], "fid": [3.0, 2.0], "n": [1, 1]})
    write_fid_plot(series, tmp_path / "f.png", tmp_path / "f.csv", "T")
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "f.csv").read_text().splitlines()[0] == "model,steps,fid,n"
    np.savez(tmp_path / "s.npz", images=np.zeros((10, 8, 8, 1), np.uint8))
    write_sample_grid(tmp_path / "s.npz", tmp_path / "g" / "s.png")
    assert (tmp_path / "g/s.png").read_bytes()[:4] == b"\x89PNG"


def test_reported_vs_reproduced_lines(tmp_path):
    rows = [_row("pd", 1, s, write_metrics(tmp_path, f"pd1-{s}", fid=f, nfe=1)) for s, f in [(0, 9.0), (1, 11.0)]]
    rows.append(_row("pd", 2, 0, "results/metrics/absent.json"))
    reported = [
        {"system": "PD (paper)", "method": "pd", "source": "Paper, Table 2", "values": {1: 9.12, 2: 4.51, 4: 3.0}},
        {"system": "CD", "method": None, "source": "Other", "values": {1: 3.55}},
        {"system": "PD re-run", "method": "pd", "source": "CM", "values": {1: 8.34, 2: None}, "reason": "not transcribed"},
    ]
    text = render_markdown(table_context("spec.yaml", TABLE, rows, reported, root=tmp_path))
    assert "| PD (paper) | 1 | 9.12 | 10.00 | +0.88 | 10 | 2 | Paper, Table 2 |" in text
    assert "| PD (paper) | 2 | 4.51 | missing |  |  | 1 | Paper, Table 2 |" in text
    assert "| PD (paper) | 4 | 3.00 | not planned |  |  | 0 | Paper, Table 2 |" in text
    assert "| PD re-run | 1 | 8.34 | 10.00 | +1.66 |" in text
    assert "| CD | 1 |" not in text  # no method of ours to compare with: only in the reported block


def test_footer_names_the_machines_behind_the_cells(tmp_path):
    """One footer line per distinct machine record (with file counts when there are several kinds), and
    "machine not recorded" for metrics files written before the suite recorded it (older results)."""
    cpu = {"torch": "2.14.1", "device_type": "cpu", "device_name": "AMD EPYC 7B13", "device_count": 1,
           "cpu_model": "AMD EPYC 7B13", "cpu_threads": 2, "world_size": 1, "precision": "fp32"}
    gpu = {**cpu, "device_type": "cuda", "device_name": "NVIDIA H100", "device_count": 8, "world_size": 8}
    rows = [_row("pd", 1, 0, write_metrics(tmp_path, "a", fid=3.0, nfe=1, machine=cpu)),
            _row("pd", 2, 0, write_metrics(tmp_path, "b", fid=2.0, nfe=2, machine=cpu))]
    text = render_markdown(table_context("spec.yaml", TABLE, rows, [], root=tmp_path))
    assert "- Measured on: torch 2.14.1, CPU AMD EPYC 7B13, 2 threads, 1 process, fp32\n" in text
    assert text.count("Measured on") == 1 and "not recorded" not in text

    rows.append(_row("pd", 4, 0, write_metrics(tmp_path, "c", fid=1.0, nfe=4, machine=gpu)))
    rows.append(_row("pd", 8, 0, write_metrics(tmp_path, "d", fid=1.0, nfe=8)))  # an older metrics file
    text = render_markdown(table_context("spec.yaml", TABLE, rows, [], root=tmp_path))
    assert "- Measured on: torch 2.14.1, CPU AMD EPYC 7B13, 2 threads, 1 process, fp32 (2 metrics files)\n" in text
    assert ("- Measured on: torch 2.14.1, 8× NVIDIA H100 (CPU AMD EPYC 7B13, 2 threads), 8 processes, fp32 "
            "(1 metrics file)\n") in text
    assert "- Measured on: machine not recorded (1 metrics file written before the suite recorded it)\n" in text
    assert "- cells measured: 4/4" in text


def test_table_of_older_results_renders_machine_not_recorded(tmp_path):
    rows = [_row("pd", 1, 0, write_metrics(tmp_path, "a", fid=3.0, nfe=1)), _row("pd", 2, 0, "results/metrics/no.json")]
    text = render_markdown(table_context("spec.yaml", TABLE, rows, [], root=tmp_path))
    assert "- Measured on: machine not recorded (1 metrics file written before the suite recorded it)\n" in text
    assert "| PD | 3.00 | missing |" in text


# ------------------------------------------------------------------ spec text inside Markdown tables, links, plots


def _gfm_cells(line: str) -> list[str]:
    """A GFM table row split into its cells the way cmark-gfm (GitHub) does: a `|` right after a backslash never
    splits a cell, whatever comes before that backslash (`\\\\|` is no column boundary either); the outer pipes
    delimit the row. Each cell as displayed: the backslash of each `\\|` dropped (GFM's pipe unescaping, before
    inline parsing), then in one pass `\\` + ASCII punctuation → that character (Markdown escapes) and `&lt;` → `<`.
    Code spans are not modelled: the labels below hold no pair of backticks."""
    assert line.startswith("|") and line.endswith("|"), line
    cells, cur = [], ""
    for i, c in enumerate(line[1:], 1):
        if c == "|" and line[i - 1] != "\\":
            cells.append(cur)
            cur = ""
        else:
            cur += c
    assert cur == "", line
    out = []
    for cell in cells:
        kept = re.sub(r"\\\|", "|", cell)  # GFM drops the backslash of each `\\|`, scanning left to right
        shown = re.sub(r"\\([!-/:-@\[-`{-~])|&lt;", lambda m: m.group(1) or "<", kept)
        out.append(shown.strip())
    return out


def _markdown_tokens(text: str) -> list:
    """Every token of `text` parsed by markdown-it-py (CommonMark and its GFM-style tables), children inline."""
    from markdown_it import MarkdownIt

    out = []
    for tok in MarkdownIt("commonmark").enable("table").parse(text):
        out.append(tok)
        out.extend(tok.children or [])
    return out


def _shown(inline) -> str:
    """What an inline token displays, markup left out (a code span or raw HTML shows its content)."""
    return "".join(t.content for t in inline.children if t.type in ("text", "code_inline", "html_inline"))


def _markdown_tables(text: str) -> list[list[list[str]]]:
    """Each table of `text` (markdown-it-py) as its rows of displayed cell texts, header row first."""
    tables, row = [], None
    for tok in _markdown_tokens(text):
        if tok.type == "table_open":
            tables.append([])
        elif tok.type == "tr_open":
            row = []
            tables[-1].append(row)
        elif tok.type == "inline" and row is not None:  # a th or td: nothing else sits inside a table
            row.append(_shown(tok))
        elif tok.type == "table_close":
            row = None
    return tables


def _code_and_html(text: str) -> list[tuple[str, str]]:
    """(type, content) of every code span and raw HTML element markdown-it-py finds in `text`."""
    return [(t.type, t.content) for t in _markdown_tokens(text) if t.type in ("code_inline", "html_inline", "html_block")]


HOSTILE_LABELS = ["A | B", "a\\|b", "ends with \\", "|", "x]y[z", "back\\\\|slashes", "a <div> b", "x\\<y"]
# the template's own code spans, in page order: `missing` and `dvc repro` under the title, the spec's path in the footer
TEMPLATE_CODE = [("code_inline", "missing"), ("code_inline", "dvc repro"), ("code_inline", "spec.yaml")]


def test_pipes_in_spec_text_never_add_a_column(tmp_path):
    """Every row of every table keeps its header's column count, and every cell shows the spec's text as written."""
    rows = [{"row": f"m{k}", "label": label, "steps": 1, "seed": 0,
             "metrics": write_metrics(tmp_path, f"m{k}", fid=3.0, nfe=1)} for k, label in enumerate(HOSTILE_LABELS)]
    rows.append({"row": "heldout", "label": "held | out", "steps": None, "metrics": write_metrics(tmp_path, "h", fid=1.0)})
    reported = [{"system": f"paper {label}", "method": "m0", "source": f"src {label}", "values": {1: 2.0, 2: None},
                 "reason": f"why {label}"} for label in HOSTILE_LABELS]
    text = render_markdown(table_context("spec.yaml", {"id": "t", "title": "T | U"}, rows, reported, root=tmp_path))
    table, widths, shown = None, {}, []
    for line in text.splitlines():
        if not line.startswith("|"):
            table = None
            continue
        cells = _gfm_cells(line)
        if table is None:
            table = line
            widths[table] = len(cells)
        assert len(cells) == widths[table], (line, cells)
        shown.append(cells)
    firsts = [c[0] for c in shown]
    for label in HOSTILE_LABELS:
        assert label in firsts  # the FID table's row label, as written
        assert f"paper {label}" in firsts  # the reported block and the comparison
        assert [f"src {label} (why {label})"] in [c[-1:] for c in shown]
        assert [f"src {label}"] in [c[-1:] for c in shown]
    assert "held | out" in firsts
    assert text.startswith("# T | U\n")  # a heading is no table row: left as written
    # an independent parser agrees cell for cell, and finds no HTML tag (an unclosed one hides the rest of the page)
    content = [cells for cells in shown if not all(re.fullmatch(r":?-+:?", c) for c in cells)]  # no delimiter rows
    assert [row for table in _markdown_tables(text) for row in table] == content
    assert _code_and_html(text) == TEMPLATE_CODE[:2] + [("code_inline", "n/t")] + TEMPLATE_CODE[2:]


def test_line_breaks_in_spec_text_never_end_a_row_or_the_heading(tmp_path):
    """The spec models refuse line breaks; the renderer stays safe without them (params edited by hand)."""
    rows = [{"row": "pd", "label": "PD\n| 0.01 | forged |", "steps": 1, "seed": 0,
             "metrics": write_metrics(tmp_path, "pd", fid=3.0, nfe=1)}]
    text = render_markdown(table_context("spec.yaml", {"id": "t", "title": "T\n# forged heading"}, rows, [], root=tmp_path))
    assert text.startswith("# T # forged heading\n")
    assert "| PD \\| 0.01 \\| forged \\| | 3.00 |\n" in text
    assert "\n| 0.01" not in text and "\n# forged" not in text


def test_the_renderer_blanks_the_characters_the_spec_models_refuse():
    """One set of control characters: what TableText refuses is what the renderer turns into spaces (the renderer
    keeps a copy so the spec package stays out of its code fingerprint)."""
    from sferd.report.markdown import _CONTROL, one_line
    from sferd.spec.limits import CONTROL

    assert _CONTROL.pattern == CONTROL.pattern
    every = "".join(map(chr, range(0x30000)))
    assert one_line(every) == CONTROL.sub(" ", every)


def test_sample_grid_links_keep_their_text_inside_the_link(tmp_path):
    """All grid links share one paragraph: a `]` would end a link early, a backtick open a code span that runs into
    the next link (a label appears once per step count), a `<` an HTML declaration swallowing links."""
    labels = ["PD [v2] ]", "PD `v2", "x><!y", "z>", "held-out \\"]
    rows = [{"row": "pd", "label": labels[0], "steps": 1, "seed": 0,
             "metrics": write_metrics(tmp_path, "pd", fid=3.0, nfe=1)}]
    ctx = table_context("spec.yaml", TABLE, rows, [], root=tmp_path)
    grids = [{"label": "PD [v2] ]", "steps": 1, "seed": 0, "path": "pd.png"},
             {"label": "PD `v2", "steps": 1, "seed": 0, "path": "v1.png"},
             {"label": "PD `v2", "steps": 2, "seed": 0, "path": "v2.png"},
             {"label": "x><!y", "steps": 1, "seed": 0, "path": "x.png"},
             {"label": "z>", "steps": 1, "seed": 0, "path": "z.png"},
             {"label": "held-out \\", "steps": None, "seed": None, "path": "h.png"}]
    ctx["figures"] = {"plot": "t-fid.png", "grids_dir": "t-samples", "grids": grids}
    text = render_markdown(ctx)
    assert "\n[PD \\[v2\\] \\], 1 step](t-samples/pd.png) ·\n" in text
    # a backslash ending the text would escape the link's closing bracket
    assert "\n[held-out \\\\](t-samples/h.png)\n" in text
    links, href = [], None
    for tok in _markdown_tokens(text):
        if tok.type == "link_open" and tok.attrs["href"].startswith("t-samples/"):
            href, shown = tok.attrs["href"], ""
        elif tok.type == "link_close" and href is not None:
            links.append((href, shown))
            href = None
        elif href is not None:
            shown += tok.content
    assert links == [("t-samples/pd.png", "PD [v2] ], 1 step"), ("t-samples/v1.png", "PD `v2, 1 step"),
                     ("t-samples/v2.png", "PD `v2, 2 steps"), ("t-samples/x.png", "x><!y, 1 step"),
                     ("t-samples/z.png", "z>, 1 step"), ("t-samples/h.png", "held-out \\")]
    assert _code_and_html(text) == TEMPLATE_CODE


def test_spec_text_in_headings_and_sentences_opens_no_code_span_or_html(tmp_path):
    """The title, the paired baseline's label and the D14 cost lines' labels sit in prose: an unclosed `<details>`
    would fold the rest of the page away on GitHub, a backtick start a code span running past the label."""
    rows = [{"row": row, "label": label, "steps": 1, "seed": seed,
             "metrics": write_metrics(tmp_path, f"{row}{seed}", fid=3.0 + seed + (row == "pd"), nfe=1,
                                      **({"nfe_with_predictor": 2, "latent_prior_steps": 100} if row == "sferd" else {}))}
            for row, label in [("pd", "PD <details> `v2"), ("sferd", "S <div> `x\\")] for seed in (0, 1)]
    table = {"id": "t", "title": "T <details> `code", "paired_against": "pd"}
    text = render_markdown(table_context("spec.yaml", table, rows, [], root=tmp_path))
    assert _code_and_html(text) == TEMPLATE_CODE
    shown = [_shown(t) for t in _markdown_tokens(text) if t.type == "inline"]
    assert shown[0] == "T <details> `code"  # the heading
    [costs] = [s for s in shown if "NFE (D14)" in s]  # one paragraph with the lines above it
    assert costs.endswith("NFE (D14), S <div> `x\\: evaluations including the predictor branch by steps 1 → 2; plus 100 "
                          "latent-prior MLP steps per sample.")
    [paired] = [s for s in shown if s.startswith("Paired differences")]
    assert paired.startswith("Paired differences against PD <details> `v2 (FID of the row − FID of PD <details> `v2 on")
    assert "lower FID than PD <details> `v2)" in paired
    assert ["S <div> `x\\", "1", "-1.00"] == [row for table in _markdown_tables(text) for row in table][-1][:3]


def test_dollar_signs_in_plot_labels_are_text_not_mathtext(tmp_path):
    """A `$…$` in a row label or title was parsed as mathtext: `$\\frac{$` stopped the render stage."""
    import pandas as pd

    from sferd.report.figures import plain_text, write_fid_plot

    series = pd.DataFrame({"model": ["cost $\\frac{$", "$5"], "steps": [1, 2], "fid": [3.0, 2.0], "n": [1, 1]})
    write_fid_plot(series, tmp_path / "f.png", tmp_path / "f.csv", "T $\\sqrt{$")
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "f.csv").read_text().splitlines()[1] == "cost $\\frac{$,1,3.0,1"  # data keeps the label
    assert plain_text("ψ = 1.0 (paper's best)") == "ψ = 1.0 (paper's best)"  # ordinary labels: unchanged
