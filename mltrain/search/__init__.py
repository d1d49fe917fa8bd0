"""Layer 5: hyperparameter search over trial groups (``mltrain search``)."""
