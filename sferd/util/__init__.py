"""Dependency-free helpers below every other layer: user-facing errors, atomic artifact I/O, progress output."""
