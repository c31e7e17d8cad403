"""The HTTP server: OpenAI-compatible completions, the adapter admin API, health and metrics (aiohttp)."""
