"""One module per stage kind; each exposes `run(name: str, params: dict) -> None`."""
