"""Prefect flows: thin sequences of tasks that call mammoflow.stages."""
