"""The tune stage: Optuna over the head and the learning rate, and the tuned values."""
