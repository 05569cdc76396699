"""`triattn serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one engine, with the KV cache of
every request held to the TriAttention budget and earlier conversations continued from their compressed cache.

Modules, one job each:
- protocol.py: request models (what clients may send) and validation limits;
- errors.py: OpenAI-shaped error JSON and the exception handlers that produce it;
- chat_format.py: messages → prompt token ids through the chat template, and the model's output → reasoning,
  content and tool calls;
- conversations.py: kept sessions (LRU, bounded by count and KV memory) and the prefix match that reuses them;
- scheduler.py: the one worker thread that owns the model and steps every active request in turn;
- generation.py: one request's events → text deltas and a summary; keeps the finished conversation;
- responses.py: OpenAI response bodies, streamed (server-sent events) or whole;
- metrics.py: counters and gauges, in Prometheus text;
- app.py: the FastAPI routes;
- server.py: `triattn serve` (load the model in the background, run uvicorn);
- openclaw.py: `triattn openclaw`, the provider entry for OpenClaw.
"""
