"""Packages are discovered, not listed: the four source folders install as one namespace `rewrite.*`.

`rewrite/` is `rewrite`, and the sibling folders `passes/`, `export/`, `runtime/` are mapped in as
`rewrite.passes`, `rewrite.export`, `rewrite.runtime`; every package below them is found by setuptools, so a
new subpackage can never be left out of a wheel (tests/test_packaging.py builds one and checks).
Everything else is in pyproject.toml.
"""
from setuptools import find_packages, setup

FOLDERS = {"rewrite": "rewrite", "rewrite.passes": "passes", "rewrite.export": "export", "rewrite.runtime": "runtime"}

packages = [sub for name, folder in FOLDERS.items() for sub in (name, *(f"{name}.{p}" for p in find_packages(folder)))]
setup(packages=packages, package_dir=FOLDERS)
