"""Configuration: the schema (config.schema), loading with clear errors (config.loader), runtime paths."""
