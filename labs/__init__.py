"""Test, demo and benchmark labs: namespaces, VMs, boot storms, a Slurm cluster,
simulated reboots, synthetic images.  Not part of the installed package: the
product never imports this; tests, benchmarks and ``./run demo`` do."""
