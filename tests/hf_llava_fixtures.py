"""Standard transformers LLaVA folders built locally (no download), for the import/export tests.

`save_llava15_like` follows the published llava-hf/llava-1.5-7b-hf as its files read (config
fields, image token 32000 and pad token 32001 of a 32,064-entry vocabulary, the CLIP image
processor at 336 px with shortest-edge resize and centre crop, the USER/ASSISTANT chat template),
written here from those published settings at small widths with random weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

LLAVA15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

LLAVA15_PREPROCESSOR = {
    "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
    "do_rescale": True, "do_resize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "CLIPImageProcessor", "image_std": [0.26862954, 0.26130258, 0.27577711],
    "processor_class": "LlavaProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 336},
}


def llama_like_tokenizer(vocab_size: int = 32000):
    """A SentencePiece-style (Metaspace, byte fallback) BPE with Llama's specials, padded to
    `vocab_size` entries, plus <image> and <pad> after them, as llava-1.5's tokenizer has."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for ch in "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;?!'\n-":
        vocab.setdefault(ch, len(vocab))
    merges = []
    for word in ("▁USER", "▁ASSISTANT", "▁What", "▁is", "▁the", "▁image", "▁shape"):
        for i in range(2, len(word) + 1):
            piece = word[:i]
            if piece not in vocab:
                merges.append((word[:i - 1], word[i - 1]))
                vocab[piece] = len(vocab)
    while len(vocab) < vocab_size:
        vocab[f"▁w{len(vocab)}"] = len(vocab)
    model = models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Metaspace(replacement="▁", prepend_scheme="first"), decoders.ByteFallback()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})  # 32000, then <pad> 32001
    fast.add_special_tokens({"pad_token": "<pad>"})
    return fast


def save_llava15_like(out: str | Path, *, image_size: int = 336, patch_size: int = 14, seed: int = 0) -> Path:
    """llava-1.5-7b-hf's configuration at small widths (random weights), saved as its folder is."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    out = Path(out)
    tokenizer = llama_like_tokenizer()
    assert tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) == [32000, 32001]
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                       image_size=image_size, patch_size=patch_size, projection_dim=16,
                                       hidden_act="quick_gelu"),
        text_config=LlamaConfig(vocab_size=32064, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                                rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=32001),
        image_token_index=32000, projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=(image_size // patch_size) ** 2,
        tie_word_embeddings=False, pad_token_id=32001,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.save_pretrained(out)
    pp = {**LLAVA15_PREPROCESSOR, "size": {"shortest_edge": image_size},
          "crop_size": {"height": image_size, "width": image_size}}
    image_processor = CLIPImageProcessor(**{k: v for k, v in pp.items() if k not in ("image_processor_type",
                                                                                      "processor_class")})
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=LLAVA15_CHAT_TEMPLATE,
                   patch_size=patch_size, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1).save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps(pp, indent=2))
    return out


# Run in a fresh interpreter where importing llava_smoe fails: what plain transformers computes.
PLAIN_TRANSFORMERS = r'''
import importlib.abc, json, sys

class _NoLlavaSmoe(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "llava_smoe" or name.startswith("llava_smoe."):
            raise ImportError("llava_smoe must not be imported here")

sys.meta_path.insert(0, _NoLlavaSmoe())
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

folder, cases_file, out = sys.argv[1:4]
model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
processor = AutoProcessor.from_pretrained(folder, backend="pil")
results = []
for case in json.load(open(cases_file)):
    images = [Image.open(p).convert("RGB") for p in case["images"]]
    text = processor.apply_chat_template(case["conversation"], add_generation_prompt=True)
    inputs = processor(text=text, images=images or None, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0]
        generated = model.generate(**inputs, max_new_tokens=case["max_new_tokens"], do_sample=False)
    results.append({"input_ids": inputs["input_ids"][0], "pixel_values": inputs.get("pixel_values"),
                    "logits": logits, "generated": generated[0, inputs["input_ids"].shape[1]:]})
assert not any(m == "llava_smoe" or m.startswith("llava_smoe.") for m in sys.modules)
torch.save(results, out)
'''


def run_plain_transformers(folder: Path, cases: list[dict], tmp: Path) -> list[dict]:
    """Each case's input ids, pixels, logits and greedy tokens from plain transformers in a subprocess."""
    cases_file, out = tmp / "cases.json", tmp / "results.pt"
    cases_file.write_text(json.dumps(cases))
    proc = subprocess.run([sys.executable, "-c", PLAIN_TRANSFORMERS, str(folder), str(cases_file), str(out)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                               "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)
