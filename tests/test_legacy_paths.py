"""Paths from before the layout by stage keep working (hca/_legacy_paths.py): every old module name
imports as the very module of its new home, ``python -m hca.<old>`` runs, the ``config.yaml`` files
that runs saved before the move (tests/fixtures/pre_layout, written by the pre-move code) and configs
naming old class paths instantiate through the CLI, and a checkpoint recording the module class
paths of a pre-move checkpoint loads through them."""
from __future__ import annotations

import importlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hca._legacy_paths import MOVED

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "pre_layout"
NEW_TO_OLD = {f"hca.{new}": f"hca.{old}" for old, new in MOVED.items() if old != "tasks"}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_module_name_is_the_new_module(old):
    assert importlib.import_module(f"hca.{old}") is importlib.import_module(f"hca.{MOVED[old]}")


def test_an_old_name_warns_that_it_moved():
    spec = importlib.util.find_spec("hca.rl_batch")
    with pytest.warns(DeprecationWarning, match="hca.rl_batch is hca.rl.batch"):
        assert spec.loader.create_module(spec) is importlib.import_module("hca.rl.batch")


def test_old_names_of_classes_and_functions():
    from hca.data.arithmetic import ArithmeticConfig
    from hca.rl.batch import CreditConfig
    from hca.tasks.arithmetic import ArithmeticConfig as OldArithmeticConfig
    from hca.rl_batch import CreditConfig as OldCreditConfig

    assert OldCreditConfig is CreditConfig and OldArithmeticConfig is ArithmeticConfig
    # the two modules that became packages re-export what they held
    from hca.evaluation import pass_at_k
    from hca.models import load_causal_lm, tiny_llama  # noqa: F401

    assert pass_at_k(4, 2, 1) == 0.5 and load_causal_lm.__module__ == "hca.models.loading"


def test_python_m_old_path_runs_the_new_module():
    for cmd in (["hca.pipeline", "--help"], ["hca.models", "--help"]):
        out = subprocess.run([sys.executable, "-m", *cmd], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "usage:" in out.stdout
    spec = importlib.util.find_spec("hca.report")
    assert Path(spec.origin) == ROOT / "hca" / "workflows" / "report.py"


def _old_paths(text: str) -> str:
    """A config as it read before the move: every moved module's class path under its old name."""
    def sub(m):
        module, cls = m.group(1).rsplit(".", 1)
        return f"class_path: {NEW_TO_OLD.get(module, module)}.{cls}"
    return re.sub(r"class_path: (hca\.[\w.]+)", sub, text)


PRE_LAYOUT = sorted(FIXTURES.glob("*.yaml"))
# configs whose class paths together name every moved class a config can name (scorers, writer, logger, strategies)
OLD_STYLE = ["configs/rl/arithmetic_hca_mc.yaml", "configs/rl/gsm8k_hca.yaml",
             "configs/strategy/deepspeed_zero2_cpu.yaml", "configs/strategy/deepspeed_zero2.yaml"]


@pytest.mark.parametrize("config", [str(p) for p in PRE_LAYOUT] + OLD_STYLE, ids=lambda c: Path(c).name)
def test_a_config_naming_old_class_paths_instantiates(config, tmp_path, monkeypatch):
    from hca.workflows.cli import main

    path = ROOT / config
    text = path.read_text() if path.parent == FIXTURES else _old_paths(path.read_text())
    # the subcommand's own arguments, which a config saved by `fit` / `predict` carries
    text = re.sub(r"^(return_predictions|ckpt_path|weights_only):.*\n", "", text, flags=re.M)
    old = set(re.findall(r"class_path: (hca\.[\w.]+)\.\w+", text)) & set(NEW_TO_OLD.values())
    assert old, f"{config}: names no old module path; the test would prove nothing"
    base = re.search(r"^# Compose-with: (\S+)", text, re.M)
    (tmp_path / "old.yaml").write_text(text)
    args = (["--config", str(ROOT / base.group(1))] if base else []) + ["--config", str(tmp_path / "old.yaml")]
    monkeypatch.chdir(tmp_path)
    cli = main(args=args, run=False)
    named = {type(c).__module__ for c in [cli.model, cli.datamodule, *cli.trainer.loggers,
                                         *cli.trainer.callbacks, cli.trainer.strategy]}
    named |= {type(getattr(cli.model, "scorer", None)).__module__}
    for o in old:  # each old path became an instance of the class at its new path
        assert MOVED[o[4:]] in {n[4:] for n in named if n.startswith("hca.")}, (o, named)


# What pre-move checkpoints recorded (LightningCLI's hyper_parameters, read from runs written before the move).
PRE_LAYOUT_CLASS_PATHS = {
    "hca.modules.policy.HCAPolicyModule", "hca.modules.prm.PRMModule", "hca.modules.sft.SFTModule",
    "hca.modules.collector.CollectorModule", "hca.datamodules.rl_problems.ProblemDataModule",
    "hca.datamodules.trajectories.TrajectoryDataModule", "hca.datamodules.sft.SFTDataModule",
    "hca.datamodules.problems.ProblemChunkDataModule",
}


@pytest.mark.parametrize("class_path", sorted(PRE_LAYOUT_CLASS_PATHS))
def test_pre_layout_checkpoint_class_paths_resolve(class_path):
    module, name = class_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    assert cls.__module__ == module  # the class still lives where the checkpoint says


def test_a_checkpoint_as_written_before_the_move_loads(tmp_path):
    """A fitted RL module's checkpoint, with the hyper-parameters a pre-move LightningCLI run records
    (``_class_path``, ``_instantiator``), loads through ``LightningModule.load_from_checkpoint`` (which
    instantiates the class path) to the same weights."""
    import lightning as L
    import torch
    from builders.policy import make, trainer

    from hca.models.loading import char_tokenizer
    from hca.rl.batch import CreditConfig

    module, dm = make(tmp_path, credit=CreditConfig("grpo", progress_coef=0.0))
    module.tokenizer = char_tokenizer()  # the one a module rebuilt from its hyper-parameters gets
    tr = trainer(tmp_path, max_steps=1)
    tr.fit(module, datamodule=dm)
    ckpt = tmp_path / "pre_layout.ckpt"
    tr.save_checkpoint(ckpt)
    raw = torch.load(ckpt, map_location="cpu", weights_only=False)
    raw["hyper_parameters"] |= {"_class_path": "hca.modules.policy.HCAPolicyModule",
                                "_instantiator": "lightning.pytorch.cli.instantiate_module"}
    torch.save(raw, ckpt)
    loaded = L.LightningModule.load_from_checkpoint(ckpt, map_location="cpu")
    assert type(loaded) is type(module)
    loaded.configure_model()
    mine = module.model.state_dict()
    theirs = loaded.model.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
