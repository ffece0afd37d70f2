"""mtlcore: optimization trajectories and multi-task transfer."""

__version__ = "0.1.0"
