"""A tiny randomly initialised Llama with grouped-query attention, and a real word-level
tokenizer over its vocabulary, built in the test."""
import random

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


def tiny_llama(seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      attn_implementation="sdpa", use_cache=False)
    return LlamaForCausalLM(cfg).eval()


def token_samples(n=4, seqlen=32, seed=0, vocab=128):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seqlen), generator=g)


WORDS = [f"w{i}" for i in range(120)]


def word_tokenizer(adds_bos: bool) -> PreTrainedTokenizerFast:
    """A real fast tokenizer over 120 words; with adds_bos its post-processor puts <bos> in
    front of every text, as Gemma's and Llama's do."""
    vocab = {"<unk>": 0, "<bos>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", unk_token="<unk>")


def text(n=600, seed=0):
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def search_data():
    """Calibration, search and held-out token ids for a search on tiny_llama."""
    from prunerzero.search.evolve import SearchData
    return SearchData(token_samples(4, 32, 0), token_samples(4, 32, 1), token_samples(4, 32, 2))


def saved_world(root):
    """`root/m`: a saved tiny Llama with its word tokenizer; `root/t.txt`: a text in its words."""
    tiny_llama().save_pretrained(root / "m")
    word_tokenizer(True).save_pretrained(root / "m")
    (root / "t.txt").write_text("\n".join(text(300, s) for s in range(8)))
    return root
