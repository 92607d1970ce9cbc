"""Plain tensor maths, each a function (or a small class) tested against hand-worked values: boxes and IoU, the
resize and padding rules, anchors, matching and box coding, the focal-loss family, box losses, OHEM,
post-processing, and the Winograd kernel. Imports only retinanet.config (for type hints)."""
