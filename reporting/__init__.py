"""Turn finished runs (logs/<experiment>/<version>/results.json) into Markdown tables; see report.py."""
