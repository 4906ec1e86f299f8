"""Write the local models and prompt files the example configs read (nothing is downloaded).

    python examples/make_example_assets.py [--out examples/assets]

- policy/: a small Qwen2-shaped causal LM (random weights) with a character tokenizer, standing in
  for a local HF model such as Qwen2.5-0.5B-Instruct (point engine.model_path at yours instead);
- reward/ and cost/: Llama sequence-classification models (one score) over the same tokenizer,
  standing in for trained reward and cost models;
- add_train.jsonl / add_val.jsonl: "23+58=" prompts with a ground_truth column (built-in task "add").
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def write_models(out: Path, seed: int = 0) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification, Qwen2Config, Qwen2ForCausalLM

    from hfrl.data import get_task

    tok = get_task("add").tokenizer()
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id, max_position_embeddings=64)
    shape = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    models = {
        "policy": lambda: Qwen2ForCausalLM(Qwen2Config(**ids, **shape, tie_word_embeddings=True)),
        "reward": lambda: LlamaForSequenceClassification(LlamaConfig(**ids, **shape, num_labels=1)),
        "cost": lambda: LlamaForSequenceClassification(LlamaConfig(**ids, **shape, num_labels=1)),
    }
    for i, (name, build) in enumerate(models.items()):
        if (out / name / "config.json").is_file():
            continue
        torch.manual_seed(seed + i)
        build().float().save_pretrained(out / name)
        tok.save_pretrained(out / name)


def write_prompts(out: Path, seed: int = 0) -> None:
    from hfrl.data import get_task

    task = get_task("add")
    for split, num in (("train", 512), ("val", 64)):
        rows = task.make_prompts(num, seed, split)
        with open(out / f"add_{split}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "assets"))
    out = Path(parser.parse_args(argv).out)
    out.mkdir(parents=True, exist_ok=True)
    write_models(out)
    write_prompts(out)
    print(f"wrote {sorted(p.name for p in out.iterdir())} to {out}")


if __name__ == "__main__":
    main()
