"""Prefect flows: thin sequences of tasks; DVC runs the stages (each stage's module: data/, training/, …)."""
