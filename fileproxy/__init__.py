"""fileproxy: an adaptive streaming reverse proxy for file delivery."""

__version__ = "0.1.0"
