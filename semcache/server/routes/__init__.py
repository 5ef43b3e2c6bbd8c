"""The sidecar's routers: ``ops`` (health, metrics), ``chat`` (OpenAI-compatible), ``cache``."""
