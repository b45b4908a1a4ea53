"""The report stage: figures, the study report, model cards, the Prefect summary."""
