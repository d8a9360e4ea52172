"""spear: SPEAR-style speech + audio pre-training at scale.

The installed package maps the repository's top-level folders under one import root:
``pipeline/`` -> ``spear.pipeline``, ``stages/`` -> ``spear.stages``, ``quantizer/`` ->
``spear.quantizer``, ``student/`` -> ``spear.student``.
"""

__version__ = "0.1.0"
