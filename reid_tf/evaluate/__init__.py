"""Stage 3, evaluation: the one extraction path (extract), distances and CMC / mAP / mINP
(metrics), re-ranking, the evaluation of a model on a query/gallery pair (evaluator), the
features.npz format and pictures (visualize)."""
