"""SDRM: rank-reduced, distributed attention for visual defect inspection (no MQTT in here)."""

__version__ = "0.1.0"
