"""spear.pipeline: the top-level folder `pipeline/` under the one import root `spear`."""

# From the repository root, `import pipeline.x` would load a second copy of these modules whose
# classes are not spear.pipeline's; refuse that spelling.
if __name__ != "spear.pipeline":
    raise ImportError(
        f"import spear.pipeline, not {__name__}: the folder is the package spear.pipeline"
    )
