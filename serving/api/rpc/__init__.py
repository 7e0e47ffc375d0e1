"""What the gRPC adapters share: the handler wrapper that maps engine errors to statuses
and counts requests (handlers.py, status.py), the guard that turns undecodable request
bytes into INVALID_ARGUMENT (wire.py), and TLS and bearer-token authentication (auth.py)."""
