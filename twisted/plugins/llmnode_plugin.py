"""twistd plugin: `twistd llmnode --config config.yaml`."""

from twisted.application.service import ServiceMaker

llmnode = ServiceMaker(
    "llmnode",
    "llmnode.tap",
    "Serve local LLM backends, started on demand, behind one OpenAI-compatible endpoint.",
    "llmnode",
)
