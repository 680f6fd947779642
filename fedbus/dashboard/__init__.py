"""The live dashboard: ``fedbus coordinator serve`` (FastAPI + uvicorn) over one coordinator state.

It reads the same SQLite database the running coordinators write, over read-only
connections, so it needs no process in between and cannot change a run by reading.
Actions (stop, mark valid, start) exist only with ``--allow-actions``.
"""
