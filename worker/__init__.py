"""akm-worker: run akm task assets on a schedule and record every run."""

__version__ = "0.1.0"
