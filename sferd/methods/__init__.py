"""Training procedures: teacher, progressive distillation, and (next) SFERD and the baselines."""
