"""`lmlab serve`: an OpenAI-compatible HTTP API (app.py) over a continuous-batching scheduler (scheduler.py), with a
chat page (page.html). docs/serving.md describes the routes, what is batched and the limits."""
