"""A tiny RL setup shared by the tests of the RL module and of what runs it (LoRA, DeepSpeed, several
ranks, legacy paths): a 7-token vocabulary, problems whose answers are "1" or "2", a deterministic step
scorer, and a Trainer without loggers."""
import json

import lightning as L
import torch

from hca.datamodules.rl_problems import ProblemDataModule
from hca.models.loading import char_tokenizer
from hca.modules.policy import HCAPolicyModule
from hca.rl.batch import CreditConfig
from hca.rl.ppo import PPOConfig
from hca.rl.scoring import CallableScorer

# A 7-token vocabulary ("1", "2", "\n" and the specials) so that a random tiny model answers "1"/"2"
# often enough for groups with outcome variance.
TINY = ("tiny-llama:hidden_size=32,intermediate_size=64,num_hidden_layers=1,num_attention_heads=2,"
        "num_key_value_heads=1,max_position_embeddings=64")


def value_fn(prompt, prefix):
    return 0.3 + 0.1 * prefix.count("1") % 0.7  # deterministic, varies with the prefix


def write_problems(path, n, offset=0):
    with open(path, "w") as f:
        for i in range(n):
            a = str(1 + (i % 2))
            rec = {"id": f"q{offset + i}", "prompt": f"Q:{a}\n", "answer": a, "task": "arithmetic"}
            f.write(json.dumps(rec) + "\n")
    return str(path)


def make(tmp_path, credit=None, ppo=None, reference=False, validation=None, problems_per_step=2, lr=1e-2):
    tmp_path.mkdir(parents=True, exist_ok=True)
    dm = ProblemDataModule(train_file=write_problems(tmp_path / "train.jsonl", 8),
                           val_file=write_problems(tmp_path / "val.jsonl", 4, offset=100),
                           problems_per_step=problems_per_step, val_batch_size=2, seed=0)
    credit = credit or CreditConfig("grpo", progress_coef=1.0, entropy_beta=1.0)
    module = HCAPolicyModule(policy=TINY, reference=TINY if reference else None,
                             scorer=CallableScorer(value_fn) if credit.progress_coef else None,
                             optimizer=lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.0), credit=credit,
                             ppo=ppo or PPOConfig(group_size=4), sampling={"max_new_tokens": 6},
                             delimiter="\n", validation=validation, seed=0)
    module.tokenizer = char_tokenizer(list("12\n"))
    return module, dm


def trainer(tmp_path, max_steps, callbacks=(), **kw):
    kw.setdefault("enable_checkpointing", False)
    kw.setdefault("limit_val_batches", 0)
    return L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0,
                     callbacks=list(callbacks), log_every_n_steps=1, **kw)


def initial_weights(module):
    module.configure_model()
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def changed(a, b):
    return [k for k in a if not torch.equal(a[k], b[k])]
