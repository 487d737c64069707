"""The EE build pipeline: import an image, profile it, build its release (copy-set
archives, manifests, NFS trees, kernel, initrd with the agent)."""
