"""The supervisor: owns the config, spawns and watches gateways, workers and the dashboard."""
