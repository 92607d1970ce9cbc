"""Tools around a detector that explain it: anchor coverage of a dataset, anchors fitted to it and their report,
and the inspection of a dataset after the transforms."""
