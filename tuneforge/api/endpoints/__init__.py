"""`/endpoints`: dedicated endpoints (api-contract 5). The lifecycle itself is `tuneforge/endpoints/supervisor.py`."""
