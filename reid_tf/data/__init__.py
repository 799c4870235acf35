"""Stage 1, data: where images come from (sources, synthetic), how they are split (splits) and
how they reach the model (preprocessing, pipeline)."""
