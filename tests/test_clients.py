"""Real clients against a live node: the official openai SDK, over the demo backend and over a
real llama.cpp server (the xllamacpp wheel) with a tiny generated GGUF."""

from __future__ import annotations

import base64
import hashlib
import os
import tempfile

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from llmnode.demo.backend import PNG_1X1, speech_wav
from tests.support.nodes import base_url, demo_model, free_port, start_node


def _openai():
    import openai
    return openai


async def sdk_client(testcase, models: dict):
    """An openai SDK client of a node serving C{models}; both end with the test."""
    service = await start_node(testcase, models)
    client = _openai().OpenAI(base_url=base_url(service) + "/v1", api_key="unused",
                              max_retries=0, timeout=20)
    testcase.addCleanup(client.close)
    return client


class OpenAISDKTests(TestCase):
    timeout = 60

    def client(self):
        return sdk_client(self, {
            "chat": demo_model(free_port(), aliases=["gpt-3.5-turbo"]),
            "embed": demo_model(free_port(), mode="Embedding"),
        })

    async def test_chat(self):
        client = await self.client()
        reply = await deferToThread(client.chat.completions.create, model="gpt-3.5-turbo",
                                    messages=[{"role": "user", "content": "say hi"}])
        self.assertIn("say hi", reply.choices[0].message.content)
        self.assertEqual(reply.choices[0].finish_reason, "stop")

    async def test_chat_streaming(self):
        client = await self.client()

        def stream():
            chunks = client.chat.completions.create(
                model="chat", stream=True, messages=[{"role": "user", "content": "count"}])
            return [chunk.choices[0].delta.content for chunk in chunks if chunk.choices]

        pieces = await deferToThread(stream)
        self.assertGreaterEqual(len(pieces), 2)
        self.assertTrue("".join(p or "" for p in pieces))

    async def test_completions(self):
        client = await self.client()
        reply = await deferToThread(client.completions.create, model="chat",
                                    prompt="Once upon a time")
        self.assertIsInstance(reply.choices[0].text, str)
        self.assertTrue(reply.choices[0].text)

    async def test_embeddings(self):
        client = await self.client()
        reply = await deferToThread(client.embeddings.create, model="embed",
                                    input=["one", "two", "one"])
        vectors = [item.embedding for item in reply.data]
        self.assertEqual(len(vectors), 3)
        self.assertEqual(vectors[0], vectors[2])
        self.assertNotEqual(vectors[0], vectors[1])

    async def test_models_list(self):
        client = await self.client()
        models = await deferToThread(lambda: [m.id for m in client.models.list()])
        self.assertEqual(set(models), {"chat", "gpt-3.5-turbo", "embed"})

    async def test_unknown_model_raises_not_found(self):
        client = await self.client()
        openai = _openai()
        with self.assertRaises(openai.NotFoundError):
            await deferToThread(client.chat.completions.create, model="no-such-model",
                                messages=[{"role": "user", "content": "hi"}])


class OpenAISDKEndpointTests(TestCase):
    """One node port serving a chat, a transcription, a speech and an image model to the SDK."""

    timeout = 60

    def client(self):
        return sdk_client(self, {
            "chat": demo_model(free_port()),
            "whisper": demo_model(free_port(), mode="Audio"),
            "tts": demo_model(free_port(), mode="Speech"),
            "sd": demo_model(free_port(), mode="Image"),
        })

    async def test_audio_transcription(self):
        client = await self.client()
        audio = b"RIFF" + bytes(range(256)) * 40
        reply = await deferToThread(client.audio.transcriptions.create, model="whisper",
                                    file=("speech.wav", audio, "audio/wav"))
        self.assertEqual(reply.text, f"transcribe: {len(audio)} bytes, sha256 "
                                     f"{hashlib.sha256(audio).hexdigest()}")

    async def test_audio_speech(self):
        client = await self.client()
        reply = await deferToThread(client.audio.speech.create, model="tts", voice="alloy",
                                    input="hello from the node")
        self.assertEqual(reply.content, speech_wav("hello from the node"))

    async def test_images_generate(self):
        client = await self.client()
        reply = await deferToThread(client.images.generate, model="sd", prompt="a red fox",
                                    n=2)
        self.assertEqual([base64.b64decode(image.b64_json) for image in reply.data],
                         [PNG_1X1, PNG_1X1])
        self.assertEqual(reply.data[0].revised_prompt, "a red fox")

    async def test_responses_create(self):
        client = await self.client()
        reply = await deferToThread(client.responses.create, model="chat",
                                    input="what is new")
        self.assertEqual(reply.output_text, "echo: what is new")
        self.assertEqual(reply.status, "completed")

    async def test_wrong_model_for_the_endpoint_raises_bad_request(self):
        client = await self.client()
        with self.assertRaises(_openai().BadRequestError) as caught:
            await deferToThread(client.images.generate, model="whisper", prompt="x")
        self.assertIn("mode 'Audio'", str(caught.exception))


class LlamaCppTests(TestCase):
    """A real llama.cpp server behind the node."""

    timeout = 120

    async def client(self):
        try:
            import xllamacpp  # noqa: F401
        except ImportError as e:  # the wheel exists for Linux x86_64/arm64 and macOS only
            raise SkipTest(f"xllamacpp is not available on this platform: {e}")
        from tests.support.tiny_gguf import write_tiny_gguf
        folder = tempfile.mkdtemp(prefix="llmnode-gguf-")
        self.addCleanup(lambda: __import__("shutil").rmtree(folder, ignore_errors=True))
        model = write_tiny_gguf(os.path.join(folder, "tiny.gguf"))
        command = (f'"$LLMNODE_PYTHON" -m llmnode.demo.llamacpp --model {model.path} '
                   f'--port "$LLMNODE_PORT" --threads 1 --alarm 300')

        def llama(mode, flags=""):
            return {"mode": mode, "port": free_port(), "start_timeout": 60,
                    "CPU": {"required_devices": ["cpu"], "script_path": f"{command} {flags}",
                            "memory_mb": {"cpu": 16}}}

        service = await start_node(self, {"tiny": llama("Chat"),
                                          "tiny-embed": llama("Embedding", "--embedding")})
        client = _openai().OpenAI(base_url=base_url(service) + "/v1", api_key="unused",
                                  max_retries=0, timeout=60)
        self.addCleanup(client.close)
        return client, model

    async def test_chat_completions_and_embeddings(self):
        client, model = await self.client()
        messages = [{"role": "user", "content": "hello"}]
        reply = await deferToThread(client.chat.completions.create, model="tiny",
                                    messages=messages, max_tokens=8)
        self.assertIsInstance(reply.choices[0].message.content, str)
        self.assertLessEqual(reply.usage.completion_tokens, 8)

        def stream():
            return [chunk for chunk in client.chat.completions.create(
                model="tiny", messages=messages, max_tokens=8, stream=True)]

        chunks = await deferToThread(stream)
        self.assertGreaterEqual(len(chunks), 2)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        self.assertIsInstance(text, str)

        reply = await deferToThread(client.completions.create, model="tiny",
                                    prompt="The sky is", max_tokens=8)
        self.assertIsInstance(reply.choices[0].text, str)

        reply = await deferToThread(client.embeddings.create, model="tiny-embed",
                                    input="hello world")
        self.assertEqual(len(reply.data[0].embedding), model.n_embd)
