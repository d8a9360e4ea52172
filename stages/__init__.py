"""spear.stages: the top-level folder `stages/` under the one import root `spear`."""

# From the repository root, `import stages.x` would load a second copy of these modules whose
# classes are not spear.stages's; refuse that spelling.
if __name__ != "spear.stages":
    raise ImportError(
        f"import spear.stages, not {__name__}: the folder is the package spear.stages"
    )
