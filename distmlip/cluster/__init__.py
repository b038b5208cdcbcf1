"""torchrun/SLURM jobs: who the ranks are, how they meet, and how ranks other than 0 serve.

Modules: ``launch`` (launch detection, the identity every rank must share), ``store`` (the
job's TCP store and the failures posted there), ``secret`` (the job's shared secret),
``network`` (interfaces and listeners), ``rendezvous`` (rank 0's listener and checks, the
serving loop of ranks > 0).
"""
