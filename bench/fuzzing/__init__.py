"""The parts of `make fuzz` (bench/fuzz.py): the models it serves (models.py), hostile and
valid values (values.py), the requests of every RPC (cases.py for recur.v1 and the table
of all, cases_v2.py for the Open Inference Protocol and health, case.py what they share),
the sessions and sequences it drives and replays (scenarios.py), the calls and their
counts (client.py), and the health and memory watch on the server (monitor.py)."""
