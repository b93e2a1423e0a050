#!/usr/bin/env python
"""Train from a YAML run file: the same command as ``nexus train``, under the name seed 004 uses.

    python scripts/train.py --config configs/training_dolma.yaml --use_wandb
    python scripts/train.py --config configs/training_dolma.yaml --resume checkpoints/checkpoint_step_5000.pt
    python scripts/train.py --config configs/test.yaml --device cpu

Every flag of ``nexus train`` works here (``--help`` lists them).
"""
import sys
from pathlib import Path

# Python puts scripts/ on sys.path, not the repository root: add it so a checkout runs uninstalled.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nexus.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
