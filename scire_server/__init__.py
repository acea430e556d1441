"""Scire server: the daemon, its store, its PKI and the admin CLI."""

__version__ = "0.1.0"
__all__ = ["__version__"]
