"""A randomly initialised model of a teacher's config, with its tokenizer: it trains and decodes at the speed the
teacher does (speed does not depend on the weights), and needs no weights downloaded or dequantised.

usage: python benchmarks/random_teacher.py CONFIG_AND_TOKENIZER_DIR OUT_DIR      (train_speed.sh: TEACHER=OUT_DIR)
   or: python benchmarks/random_teacher.py tests/assets/qwen3-8b OUT_DIR          (a config alone: no tokenizer copied)
"""

import shutil
import sys
from pathlib import Path

import torch
import transformers

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
config = transformers.AutoConfig.from_pretrained(src)
dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32  # the config's own (bf16 for Qwen3)
model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype)
model.save_pretrained(dst)
for f in src.iterdir():
    if f.name.startswith(("tokenizer", "chat_template", "generation", "special_tokens", "vocab", "merges")):
        shutil.copy(f, dst / f.name)
print("random teacher in", dst)
