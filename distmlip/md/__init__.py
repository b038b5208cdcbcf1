"""Molecular dynamics around the calculator: ASE integrators and their restartable state
(``dynamics``), trajectories written frame by frame (``trajectory``), atomic file writes
(``durable``)."""
