"""Tiny random Hugging Face checkpoints saved to local folders (no hub): a GPT-2 (dense) and a
Mixtral (MoE, 4 experts, top-2) of one word-level tokenizer, for the TransformerBridge tests."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedTokenizerFast,
)

D_VOCAB = 40
D_MODEL = 32
N_EXPERTS, TOP_K = 4, 2


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Words t0..t39 are ids 0..39; t0 is BOS and EOS."""
    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(D_VOCAB)}, unk_token="t1"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="t0", eos_token="t0")


def gpt2(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=D_MODEL, n_head=2, n_positions=16, vocab_size=D_VOCAB)
    return GPT2LMHeadModel(cfg).eval()


def mixtral(seed: int) -> MixtralForCausalLM:
    torch.manual_seed(seed)
    cfg = MixtralConfig(
        vocab_size=D_VOCAB, hidden_size=D_MODEL, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, num_local_experts=N_EXPERTS,
        num_experts_per_tok=TOP_K, max_position_embeddings=16,
    )  # fmt: skip
    return MixtralForCausalLM(cfg).eval()


def save(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def random_tokens(n_seq: int = 6, seq_len: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, D_VOCAB, (n_seq, seq_len), generator=g)
    tokens[:, 0] = 0  # BOS
    return tokens
