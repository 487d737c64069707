"""Content-addressed objects over HTTP (``GET``/``HEAD /objects/sha256/<hex>``): the
routes, the fast path, the listener.  One implementation for both servers of objects:
a relay (from its cache, fetching what it lacks) and the core's object server (from
the store); so neither imports the other."""
