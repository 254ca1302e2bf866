"""The bus: every wire format (bus.protocol), endpoint and topic (bus.endpoints), codec (bus.codec)."""
