"""What tests/ and benchmarks/ share: free ports, live servers (werkzeug, gunicorn, streamlit),
the Docker stack, the package probe and the load clients. Not part of the served package; it is
installed beside it (pyproject's package discovery) so that both import it by name."""
