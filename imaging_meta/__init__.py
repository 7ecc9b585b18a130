"""imaging-meta: few-shot meta-learning for medical images."""

__version__ = "0.1.0"
