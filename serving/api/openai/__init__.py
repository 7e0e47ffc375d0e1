"""The OpenAI-compatible API (legacy Completions, the model list) and Recur's sessions
over HTTP, as routes of the HTTP port (serving/api/http/)."""
