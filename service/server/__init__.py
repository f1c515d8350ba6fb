"""The HTTP server on the engine: the BentoML service (service.py), the OpenAI-compatible
routes and their protocol models, middleware, the request log, settings and the playground.
It imports the engine's public names only (`from service.engine import ...`)."""
