"""attmask: attention-guided masked image modeling (AttMask) on the iBOT/DINO framework.

The library runs and tests without Ray or MLflow; ``pipelines/`` orchestrates it at scale.
``attmask.load_backbone(ref)`` returns a trained teacher backbone as a timm model.
"""
__version__ = "0.2.0"


def load_backbone(ref, **kwargs):
    """A trained teacher backbone as a timm ``VisionTransformer``: see
    :func:`attmask.models.export.load_backbone` (imported on first use, so ``import attmask``
    stays cheap for the command line)."""
    from attmask.models.export import load_backbone as load

    return load(ref, **kwargs)
