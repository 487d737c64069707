"""The core: the registry (the paper's EE profiler) and the artifact store, shared by its
three parts: the online control plane (control/), the EE build pipeline (build/) and the
supervisors of the external daemons it runs (daemons/)."""
