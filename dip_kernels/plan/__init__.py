"""Plans: an op written once as data (its layers as GEMM steps) and run by every backend's executor."""
