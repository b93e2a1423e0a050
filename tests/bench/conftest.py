"""Puts the repository root on ``sys.path`` so that ``import bench`` finds the benchmark package there.

This folder has no ``__init__.py`` on purpose: as a package it would be imported under the name
``bench`` and shadow the repository's ``bench`` package.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
