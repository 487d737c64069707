"""The core: EE registry (the paper's EE profiler), runtime state, request redirection, gRPC."""
