"""Daemons SLIM supervises wherever they run: the supervisor base class and nfs-ganesha's
configuration and supervision, shared by the core (``slim nfs serve``) and relays that export
trees of their own (docs/relay.md)."""
