"""Training dynamics over checkpoints: per-checkpoint summaries and the timeline (``run``: ``run_evolution``),
and the figures and page (``page``)."""
