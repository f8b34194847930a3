"""thinkbrake server: OpenAI-compatible HTTP serving around the controller."""
