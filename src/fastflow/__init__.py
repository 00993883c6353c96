"""fastflow: unsupervised visual anomaly detection and localization with FastFlow."""

__version__ = "0.1.0"
