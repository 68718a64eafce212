"""Thin Ray/MLflow orchestration over the ``attmask`` library."""
