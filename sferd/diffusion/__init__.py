"""Diffusion maths shared by every method: schedule, parameterizations, samplers, losses."""
