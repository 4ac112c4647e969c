"""Offline CLIP tokenizer and tiny text encoders (no vocab download)."""
from __future__ import annotations

from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def offline_clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """A byte-level CLIP tokenizer whose vocab is the 256 byte symbols (+ their ``</w>`` forms)."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    for ch in alphabet:
        vocab[ch + "</w>"] = len(vocab)
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length, pad_token=EOS)
    return tok


def tiny_clip_config(tok: CLIPTokenizer, hidden: int = 32, projection_dim: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tok.model_max_length,
        projection_dim=projection_dim,
        bos_token_id=tok.convert_tokens_to_ids(BOS),
        eos_token_id=tok.convert_tokens_to_ids(EOS),
        pad_token_id=tok.convert_tokens_to_ids(EOS),
    )


def tiny_clip_text_model(tok: CLIPTokenizer, hidden: int = 32, with_projection: bool = False):
    cfg = tiny_clip_config(tok, hidden=hidden, projection_dim=hidden)
    return CLIPTextModelWithProjection(cfg) if with_projection else CLIPTextModel(cfg)
