"""ssmpi: depth-parallel video training with Sideways and Skip-Sideways over MPI."""

__version__ = "0.1.0"
