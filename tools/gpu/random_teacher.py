"""A randomly initialised model of a teacher folder's config, with its tokenizer: it times exactly like the teacher.

usage: python tools/gpu/random_teacher.py CONFIG_AND_TOKENIZER_DIR OUT_DIR   (train_speed.sh's TEACHER=OUT_DIR)
"""
import shutil, sys
from pathlib import Path
import torch, transformers
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(src))
model.save_pretrained(dst)
for f in src.iterdir():
    if f.name.startswith(("tokenizer", "chat_template", "generation")):
        shutil.copy(f, dst / f.name)
print("random teacher in", dst)
