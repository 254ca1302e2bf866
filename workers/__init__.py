"""Workers: one process per model, owning one backend (a llama-server child, or faster-whisper)."""
