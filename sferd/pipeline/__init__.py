"""Spec → stage graph → DVC files (pure functions) and the stage runner."""
