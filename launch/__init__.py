"""kdflow's command line and launchers (local by default; SLURM and Ray plug in beside it)."""
