"""sferd: reproducible SFERD and progressive distillation."""
__version__ = "0.1.0"
