"""MammoFlow: transfer-learning classification of mammograms, tracked end to end."""
