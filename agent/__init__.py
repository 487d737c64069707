"""The node agent: EE service locator and file synchronization module (runs in the initrd)."""
