"""TRL's GRPOTrainer on a local model folder and GSM8K prompts: the peer side of ``benchmarks/rl_step_model.py``.

Runs in a venv of its own (TRL is not a dependency of hca): torch 2.13.0+cpu, trl, datasets and the
transformers of hca's venv. Extended from ``/work/shared/peers/trl_grpo_tiny.py`` (same fixed settings:
beta 0, so no reference model; ``num_iterations`` 1; one generation batch per optimizer step; HF
generate, no vLLM; fp32; no reporting) to a real model and real prompts:

* the model is ``--model`` (an HF folder, loaded in fp32), its tokenizer padding on the left;
* the prompts are ``--problems``: JSONL lines ``{"prompt": <text rendered by hca's PromptFormat, chat
  template applied>, "answer": <GSM8K answer line>}``, written by ``rl_step_model.py`` so that both
  frameworks sample after the same texts (TRL tokenizes them with ``add_special_tokens=False``);
* reward: 1 when the last number of the completion equals the number after ``####`` (cheap; the
  reward's cost is noise next to the model's at this shape);
* ``--problems-per-step`` x ``--samples`` completions per optimizer step, generated at once
  (``generation_batch_size``), trained ``--micro-batch`` at a time with gradient accumulation,
  ``--max-new-tokens``, temperature 1, top-p 1, learning rate 1e-6, grad clip 1.0 (TRL's default).

Writes ``--out`` (JSON): per optimizer step the wall time, completions and completion tokens; the
first ``--warmup`` steps are untimed. Last line printed: ``samples_per_s=<x> tokens_per_s=<y>``.
"""
import argparse
import json
import os
import re
import shutil
import tempfile
import time

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
COUNTS = {"completions": 0, "tokens": 0, "generate_s": 0.0}


def gsm8k_number(text: str) -> str | None:
    found = _NUM.findall(text)
    return found[-1].replace(",", "").rstrip(".") if found else None


def last_number_reward(prompts, completions, answer, completion_ids=None, **kwargs):
    COUNTS["completions"] += len(completions)
    COUNTS["tokens"] += sum(len(c) for c in completion_ids) if completion_ids is not None else 0
    out = []
    for text, ans in zip(completions, answer):
        gold = gsm8k_number(ans.split("####")[-1])
        out.append(1.0 if gold is not None and gsm8k_number(text) == gold else 0.0)
    return out


class StepTimer(TrainerCallback):
    def __init__(self):
        self.marks = []  # (time, completions so far, tokens so far, generate seconds so far), one per optimizer step

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append((time.perf_counter(), COUNTS["completions"], COUNTS["tokens"], COUNTS["generate_s"]))


def timed_generate(model):
    """Wrap ``model.generate`` (what GRPOTrainer samples with when vLLM is off) to add its wall time to
    ``COUNTS["generate_s"]``: a step's sampling share; the rest is TRL's scoring, loss and update."""
    inner = model.generate

    def generate(*a, **kw):
        t0 = time.perf_counter()
        try:
            return inner(*a, **kw)
        finally:
            COUNTS["generate_s"] += time.perf_counter() - t0

    model.generate = generate


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--problems-file", required=True)
    ap.add_argument("--problems-per-step", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    ap.add_argument("--micro-batch", type=int, default=8, help="per_device_train_batch_size; gradient "
                    "accumulation makes one optimizer step of a whole generation batch")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [json.loads(line) for line in open(args.problems_file)]
    tok = AutoTokenizer.from_pretrained(args.model)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    timed_generate(model)
    batch = args.problems_per_step * args.samples
    steps = args.steps + args.warmup
    out_dir = tempfile.mkdtemp(prefix="trl_grpo_model_")
    if batch % args.micro_batch:
        raise SystemExit(f"--micro-batch {args.micro_batch} must divide {batch} completions per step")
    cfg = GRPOConfig(output_dir=out_dir, per_device_train_batch_size=args.micro_batch,
                     gradient_accumulation_steps=batch // args.micro_batch, generation_batch_size=batch,
                     num_generations=args.samples, max_completion_length=args.max_new_tokens, max_steps=steps,
                     learning_rate=1e-6, beta=0.0, num_iterations=1, temperature=1.0, top_p=1.0, bf16=False,
                     fp16=False, use_cpu=True, use_vllm=False, report_to="none", save_strategy="no", logging_steps=1,
                     disable_tqdm=True, dataloader_num_workers=0, seed=0)
    timer = StepTimer()
    data = Dataset.from_dict({"prompt": [r["prompt"] for r in rows], "answer": [r["answer"] for r in rows]})
    trainer = GRPOTrainer(model=model, reward_funcs=last_number_reward, args=cfg, train_dataset=data,
                          processing_class=tok, callbacks=[timer])
    t0 = time.perf_counter()
    trainer.train()
    shutil.rmtree(out_dir, ignore_errors=True)
    assert len(timer.marks) == steps, timer.marks
    marks = [(t0, 0, 0, 0.0)] + timer.marks
    per_step = [{"seconds": b[0] - a[0], "samples": b[1] - a[1], "tokens": b[2] - a[2], "time_generation": b[3] - a[3]}
                for a, b in zip(marks, marks[1:])]
    timed = per_step[args.warmup:]
    secs, samples, tokens = (sum(s[k] for s in timed) for k in ("seconds", "samples", "tokens"))
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    res = {"contender": "trl", "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                            "trl": trl.__version__},
           "threads": torch.get_num_threads(), "steps": per_step, "warmup": args.warmup, "seconds": secs,
           "samples": samples, "tokens": tokens, "mean_reward": sum(rewards) / max(len(rewards), 1)}
    with open(args.out + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(f"versions: torch={torch.__version__} transformers={transformers.__version__} trl={trl.__version__} "
          f"threads={torch.get_num_threads()}")
    print(f"samples_per_s={samples / secs:.3f} tokens_per_s={tokens / secs:.1f}")


if __name__ == "__main__":
    main()
