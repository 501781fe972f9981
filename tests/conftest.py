import os

# DVC telemetry forks a daemon that, offline, litters the temp folder (conventions.md §6).
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
