"""rewrite: a compiler for adapters. Public API only; see README.md."""
__version__ = "0.1.0"
