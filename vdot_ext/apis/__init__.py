"""User-facing entry points on top of the models and the VCU data path: loading a
trained student from any of its files, few-step inference on one's own VCU, and
export to the Wan2.1 release layout (docs/DESIGN.md §1, §8).

Submodules are imported on use (``vdot_ext.apis.export``, ``.student``,
``.codecs``, ``.inference``): importing the package pulls in nothing heavy.
"""
