"""A randomly initialised model of a teacher's config, with its tokenizer: it trains and decodes at the speed the
teacher does (speed does not depend on the weights), and needs no weights downloaded or dequantised.

usage: python benchmarks/random_teacher.py CONFIG_AND_TOKENIZER_DIR OUT_DIR      (train_speed.sh: TEACHER=OUT_DIR)
   or: python benchmarks/random_teacher.py tests/assets/qwen3-8b OUT_DIR          (a config alone: no tokenizer copied)
   or: python benchmarks/random_teacher.py tests/assets/qwen3-8b OUT_DIR TOKENIZER_DIR
       (the tokenizer files of another folder, for `convert`, which reads its text through the teacher's tokenizer;
       any tokenizer whose ids fit the config's vocab_size times the same: Qwen2.5's stands in for Qwen3's, the
       same byte-level BPE and vocabulary size, e.g. the folder `attnedit` dequantises the Qwen2.5-Coder GGUF into)
"""

import shutil
import sys
from pathlib import Path

import torch
import transformers

TOKENIZER_FILES = ("tokenizer", "chat_template", "special_tokens", "vocab", "merges")
if len(sys.argv) not in (3, 4):
    sys.exit(__doc__)
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
tok_src = Path(sys.argv[3]) if len(sys.argv) == 4 else src
torch.manual_seed(0)
config = transformers.AutoConfig.from_pretrained(src)
dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32  # the config's own (bf16 for Qwen3)
if tok_src != src:
    try:
        n_tok = len(transformers.AutoTokenizer.from_pretrained(tok_src))
    except (OSError, ValueError) as e:
        sys.exit(f"no tokenizer in {tok_src} ({str(e).splitlines()[0]}); give a folder with tokenizer.json")
    if n_tok > config.vocab_size:
        sys.exit(f"the tokenizer in {tok_src} has {n_tok} tokens, more than the config's vocab_size {config.vocab_size}; use one that fits")
# built on the GPU where there is one: the random init of 8B parameters takes seconds there, many minutes on one CPU thread
with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype)
model.save_pretrained(dst)
del model
for f in tok_src.iterdir():
    if f.name.startswith(TOKENIZER_FILES + (("generation",) if tok_src == src else ())):  # another model's generation settings stay out
        shutil.copy(f, dst / f.name)
print("random teacher in", dst)
