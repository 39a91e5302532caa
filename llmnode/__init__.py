"""llmnode: a headless compute node that launches local model servers on demand and serves
one OpenAI-compatible endpoint in front of them."""

__version__ = "0.1.0"
