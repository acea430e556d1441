"""Scire agent: enrolls with a Scire server, polls it for jobs, runs them, reports."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
