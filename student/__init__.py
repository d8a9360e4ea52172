"""spear.student: the top-level folder `student/` under the one import root `spear`."""

# From the repository root, `import student.x` would load a second copy of these modules whose
# classes are not spear.student's; refuse that spelling.
if __name__ != "spear.student":
    raise ImportError(
        f"import spear.student, not {__name__}: the folder is the package spear.student"
    )
