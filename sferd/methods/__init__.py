"""Training procedures: teacher, progressive distillation, SFERD (guidance, shifted student, latent prior)."""
