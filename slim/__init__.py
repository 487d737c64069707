"""SLIM: single Linux image management, after Wang, Lam and Cho's SLIM paper.

The paper's server components live in :mod:`slim.core` (EE profiler, request
redirection, network configuration) and :mod:`slim.relay` (file service); the
client components in :mod:`slim.agent`; the Slurm integration in
:mod:`slim.plugin`.  The gRPC contract is :mod:`slim.v1` (generated from
``protos/slim/v1``).
"""

__version__ = "0.1.0"
