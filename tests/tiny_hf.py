"""The tiny random HF T5 (gated-GELU, untied output layer) that the peft export and import tests share."""

import torch
import transformers


def tiny_hf_t5() -> transformers.T5ForConditionalGeneration:
    """2 + 2 layers, width 32, 4 heads, vocabulary 96; seeded (torch.manual_seed(0)); eval mode."""
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1)).eval()
