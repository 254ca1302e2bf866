"""The dashboard: an aiohttp app serving the web UI, fed live from the metrics bus."""
