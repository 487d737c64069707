"""The online control plane: the gRPC servicers (server.py) over the domain
(service.py), redirection, boot scripts, runtime state and the relays' streams."""
