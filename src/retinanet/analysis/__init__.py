"""The paper's analysis as tools: loss curves and worked examples (curves), the loss distribution of a trained
model over anchors (loss_cdf), and grids of training runs written as the paper's ablation tables (ablate)."""
