"""Edge relays: the paper's file service (HTTP objects, TFTP stage 1, node API)."""
