"""Shared HTTP plumbing (not an adapter): the HTTP port's server (server.py), its app and
front, where auth, limits and metrics apply to every request (app.py), and the errors
every protocol's routes raise, in each protocol's format (errors.py).

A protocol plugs in as an APIRouter, best a ShapedRouter carrying its ErrorFormat; the
server (serving/server.py) lists the routers. Routes raise EngineErrors or HttpErrors
and let the app answer them.
"""
