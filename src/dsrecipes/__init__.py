"""dsrecipes: shared model, data, metrics and planning code for the DeepSpeed + accelerate recipes."""

__version__ = "0.1.0"
