"""Serving: the OpenAI-compatible HTTP app over a Session's engine, its server, and scale-out on Ray Serve."""
