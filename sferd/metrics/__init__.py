"""FID and its provenance: torch-fidelity with either the stock Inception or the quickstart's digits CNN.

Submodules are imported explicitly (``sferd.metrics.keys`` is cheap; ``sferd.metrics.extractor`` pulls in
torch-fidelity, which the CLI must not pay for at start-up).
"""
