"""Statistics shared by the stages: intervals and the regressions of steering success."""
