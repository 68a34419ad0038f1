"""The engine's OpenAI-compatible HTTP API: ``build_app(engine)`` and ``run_server(...)``."""
