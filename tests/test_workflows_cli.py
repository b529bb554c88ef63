"""Every YAML in configs/ parses and instantiates (trainer, model, data) through the same
LightningCLI as train.py, without running anything (litgpt's config-hub test). A fragment (e.g.
configs/strategy/*.yaml, trainer settings only) names its base in a ``# Compose-with: <path>``
header line and is instantiated as ``--config <base> --config <fragment>``, as it is run."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
CONFIGS = sorted(str(p) for p in (ROOT / "configs").rglob("*.yaml"))


def test_there_are_configs():
    assert any("sft" in c for c in CONFIGS)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: str(Path(c).relative_to(Path(c).parents[1])))
def test_config_instantiates(config, tmp_path, monkeypatch):
    from hca.workflows.cli import main

    text = Path(config).read_text()
    assert "class_path" in text
    for line in text.splitlines():  # a comment on every key
        s = line.strip()
        if s and not s.startswith("#") and not s.startswith("- ") and s.endswith(":") is False and ":" in s:
            assert "#" in s, f"{config}: key without a comment: {s}"
    base = re.search(r"^# Compose-with: (\S+)", text, re.M)
    args = (["--config", str(ROOT / base.group(1))] if base else []) + ["--config", config]
    monkeypatch.chdir(tmp_path)  # nothing the configs write lands in the repo
    cli = main(args=args, run=False)
    assert cli.model is not None and cli.trainer is not None
    if base and "strategy:" in text:  # the fragment's strategy is the one the trainer got
        cls = re.search(r"strategy:.*\n\s+class_path: (\S+)", text).group(1).rsplit(".", 1)[1]
        assert type(cli.trainer.strategy).__name__ == cls


def test_print_config(capsys):
    from hca.workflows.cli import main

    with pytest.raises(SystemExit):
        main(args=["fit", "--config", next(c for c in CONFIGS if c.endswith("sft/arithmetic.yaml")), "--print_config"])
    out = capsys.readouterr().out
    assert "class_path" in out and "trainer:" in out
