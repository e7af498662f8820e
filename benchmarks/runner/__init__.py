"""`ov2 run`: experiment files -> a plan of stages -> run folders -> results table -> report."""
