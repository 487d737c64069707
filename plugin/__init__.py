"""Slurm integration: ``sbatch --constraint=ee:NAME`` reboots nodes into that EE."""
