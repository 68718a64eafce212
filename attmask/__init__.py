"""attmask: attention-guided masked image modeling (AttMask) on the iBOT/DINO framework.

The library runs and tests without Ray or MLflow; ``pipelines/`` orchestrates it at scale.
"""
__version__ = "0.1.0"
