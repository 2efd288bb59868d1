"""Cost models and measuring tools: the FLOP model, the memory simulation, the planner that turns
their savings into settings, benchmark sizes, synthetic batches and reports."""
