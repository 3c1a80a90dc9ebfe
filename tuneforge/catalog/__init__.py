"""The model catalog: names, sources and limits (torch-free); loading lives in catalog/loading.py."""
