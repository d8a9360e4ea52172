"""spear.quantizer: the top-level folder `quantizer/` under the one import root `spear`."""

# From the repository root, `import quantizer.x` would load a second copy of these modules whose
# classes are not spear.quantizer's; refuse that spelling.
if __name__ != "spear.quantizer":
    raise ImportError(
        f"import spear.quantizer, not {__name__}: the folder is the package spear.quantizer"
    )
