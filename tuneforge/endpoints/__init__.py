"""Dedicated endpoints: their lifecycle and the supervisor of their replica processes (`supervisor.py`)."""
