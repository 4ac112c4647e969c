"""The submitting side of easel: Python client, `easel` CLI, HTTP API, embedded dev services."""
