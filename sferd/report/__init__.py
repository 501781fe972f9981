"""Reports: gather metrics with pandas, render Markdown tables with Jinja (DESIGN.md step 6)."""
