"""Tiny random checkpoints built locally, for the demo, the tests and GPU checks.

No model hub is needed: a transformers config with random weights is saved with
``save_pretrained`` next to a small byte-level BPE tokenizer trained on the spot.
"""

from __future__ import annotations

import json
from pathlib import Path

ARCHITECTURES = {
    # name: (transformers config class, extra config fields)
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),  # Qwen2 carries a bias on q/k/v
    # Alternating sliding-window and full-attention layers (set sliding_window
    # through extra_config); soft-capping off; vLLM's Gemma2 ties embeddings.
    "gemma2": (
        "Gemma2Config",
        {
            "attn_logit_softcapping": None,
            "final_logit_softcapping": None,
            "tie_word_embeddings": True,
        },
    ),
}

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "attention heads are independent so each can live in its own memory",
    "long contexts need more key value cache than a single device holds",
    "host memory is large and the link streams what the device lacks",
    "numbers 0 1 2 3 4 5 6 7 8 9 and symbols , . ; : ! ? ( ) [ ] { }",
] * 20


def build_tokenizer(path: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(path)


def build_tiny_model(
    path: str | Path,
    arch: str = "llama",
    *,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 32,
    hidden_size: int | None = None,
    vocab_size: int = 512,
    max_position_embeddings: int = 8192,
    dtype: str = "float32",
    seed: int = 0,
    extra_config: dict | None = None,
) -> Path:
    """Write a random ``arch`` checkpoint with a trained tokenizer to ``path``.

    ``extra_config`` adds or overrides transformers config fields (for example
    ``{"use_sliding_window": True, "sliding_window": 64}`` for Qwen2).

    Re-uses an existing checkpoint at ``path`` when its config matches, so
    tests that share a model build it once.
    """
    import torch
    import transformers

    path = Path(path)
    config_cls_name, extra = ARCHITECTURES[arch]
    fields = dict(
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        hidden_size=hidden_size or num_heads * head_dim,
        intermediate_size=2 * (hidden_size or num_heads * head_dim),
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype=dtype,
    )
    fields.update(extra)
    fields.update(extra_config or {})
    stamp = path / "headinfer_tiny.json"
    wanted = json.dumps({"arch": arch, "seed": seed, **fields}, sort_keys=True)
    if stamp.exists() and stamp.read_text() == wanted:
        return path
    path.mkdir(parents=True, exist_ok=True)
    config = getattr(transformers, config_cls_name)(**fields)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    # Larger-than-default init spreads the logits, so greedy choices are far
    # from ties and any attention error shows up as a different token.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
            elif "bias" in name:
                p.normal_(0.0, 0.5)
    model.to(getattr(torch, dtype)).save_pretrained(path)
    build_tokenizer(path, vocab_size)
    stamp.write_text(wanted)
    return path
