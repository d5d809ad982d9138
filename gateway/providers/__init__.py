"""The provider adapters: a request in, normalised deltas, usage and typed errors out.

    base.py          the adapters' interface, normalised events, attempts, the error tree, estimates
    turn.py          the canonical turn every door parses into and every adapter renders from
    openai.py        OpenAI-compatible chat completions (OpenAI, Groq, vLLM, Ollama, ...)
    anthropic.py     Anthropic Messages
    gemini.py        Google's Gemini API (streamGenerateContent)
    demo.py          the built-in deterministic demo provider
    embeddings.py    one embeddings call to a model's provider
    chain.py         the fallback chain: each model in turn until one streams; its tracing observer
    circuit.py       a circuit breaker per model
    registry.py      the configured models and the adapters behind them
    http.py          the lean HTTP/1.1 client of the upstream calls
    sse_decoder.py   incremental SSE decoding, as browsers do it
    normalise.py     what an upstream sends, checked before it is streamed or stored
    deadlines.py     coarse deadlines for many held streams on few timers

Adapters never retry and never touch the database: the chain decides.
"""

__all__ = [
    "anthropic",
    "base",
    "chain",
    "circuit",
    "deadlines",
    "demo",
    "embeddings",
    "gemini",
    "http",
    "normalise",
    "openai",
    "registry",
    "sse_decoder",
    "turn",
]
