"""
Write a tiny llama-architecture GGUF with random weights, for tests.

llama.cpp loads it like any real model: a SentencePiece-style vocabulary with
byte fallback, a ChatML chat template, two transformer blocks. What it says
is gibberish; its shapes (embedding width, vocabulary) are real.
"""

from dataclasses import dataclass
import os

import numpy
import gguf


N_EMBD = 64
N_HEAD = 4
N_HEAD_KV = 2
N_LAYER = 2
N_FF = 128
N_CTX_TRAIN = 512

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_SPECIAL = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
_WORDS = ["the", "and", "you", "hello", "world", "model", "test", "node"]


@dataclass(frozen=True)
class TinyModel:
    """
    A generated model file and the numbers a test may check against.
    """

    path: str
    n_embd: int
    n_vocab: int
    n_layer: int


def _vocabulary():
    """
    Tokens, scores and token types of a small SentencePiece vocabulary.
    """
    tokens = list(_SPECIAL)
    types = [gguf.TokenType.UNKNOWN] + [gguf.TokenType.CONTROL] * 4
    tokens += ["<0x%02X>" % b for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    pieces = ["\u2581"]
    pieces += [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces += [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    pieces += list("0123456789.,!?'-:")
    pieces += ["\u2581" + w for w in _WORDS]
    tokens += pieces
    types += [gguf.TokenType.NORMAL] * len(pieces)
    scores = [0.0] * (len(tokens) - len(pieces))
    scores += [-float(i) for i in range(len(pieces))]
    for i, word in enumerate(_WORDS):
        scores[len(tokens) - len(_WORDS) + i] = 10.0 - i
    return tokens, scores, types


def _output_matrix(rng, types):
    """
    Output projection that favours the word pieces over bytes and controls.

    Only word pieces get weights, so sampling picks readable pieces and the
    end-of-sequence tokens practically never: a reply runs to C{max_tokens}.
    """
    weights = rng.standard_normal((len(types), N_EMBD)).astype(numpy.float32)
    normal = numpy.array([t == gguf.TokenType.NORMAL for t in types])
    weights[~normal] = 0.0
    return weights


def write_tiny_gguf(path, seed=0):
    """
    Write the model to C{path}, with weights drawn from a fixed C{seed}.

    @return: a L{TinyModel} describing the file.
    """
    rng = numpy.random.default_rng(seed)
    tokens, scores, types = _vocabulary()
    n_vocab = len(tokens)
    head_dim = N_EMBD // N_HEAD

    writer = gguf.GGUFWriter(os.fspath(path), "llama")
    writer.add_name("llmnode-tiny")
    writer.add_context_length(N_CTX_TRAIN)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_chat_template(CHAT_TEMPLATE)

    def matrix(rows, cols):
        return (rng.standard_normal((rows, cols)) * 0.1).astype(numpy.float32)

    ones = numpy.ones(N_EMBD, dtype=numpy.float32)
    writer.add_tensor("token_embd.weight", matrix(n_vocab, N_EMBD))
    for i in range(N_LAYER):
        block = "blk.%d." % i
        writer.add_tensor(block + "attn_norm.weight", ones)
        writer.add_tensor(block + "attn_q.weight", matrix(N_EMBD, N_EMBD))
        writer.add_tensor(
            block + "attn_k.weight", matrix(N_HEAD_KV * head_dim, N_EMBD))
        writer.add_tensor(
            block + "attn_v.weight", matrix(N_HEAD_KV * head_dim, N_EMBD))
        writer.add_tensor(block + "attn_output.weight", matrix(N_EMBD, N_EMBD))
        writer.add_tensor(block + "ffn_norm.weight", ones)
        writer.add_tensor(block + "ffn_gate.weight", matrix(N_FF, N_EMBD))
        writer.add_tensor(block + "ffn_up.weight", matrix(N_FF, N_EMBD))
        writer.add_tensor(block + "ffn_down.weight", matrix(N_EMBD, N_FF))
    writer.add_tensor("output_norm.weight", ones)
    writer.add_tensor("output.weight", _output_matrix(rng, types))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return TinyModel(
        path=os.fspath(path), n_embd=N_EMBD, n_vocab=n_vocab, n_layer=N_LAYER)
