"""`dgemma serve`: an OpenAI-compatible HTTP server over the row engine of runtime/rows.py (app.py: the endpoints;
service.py: the engine thread and the requests' field mapping; protocol.py: the request bodies; metrics.py:
Prometheus; replicas.py: the same application as a Ray Serve deployment; cli.py: the command). Needs the `serve`
extra: pip install 'dgemma[serve]'."""
