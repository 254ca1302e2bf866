"""Gateways: one aiohttp process per protocol (Ollama, OpenAI/LM Studio), translating HTTP to bus jobs."""
