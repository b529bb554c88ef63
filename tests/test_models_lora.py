"""LoRA for the RL policy (hca.models.lora): real RL steps change the adapters and nothing else; the export
merges them into a plain HF checkpoint that computes the same logits as the adapted policy."""
import lightning as L
import pytest
import torch

pytest.importorskip("peft")

from hca.models.lora import LoraSettings, add_lora, has_lora, merged_copy  # noqa: E402
from hca.models.loading import char_tokenizer, load_causal_lm  # noqa: E402
from hca.rl.ppo import PPOConfig  # noqa: E402
from builders.policy import TINY, changed, initial_weights, make, trainer  # noqa: E402


def test_rl_steps_change_only_lora_weights_and_export_merges(tmp_path):
    L.seed_everything(0)
    module, dm = make(tmp_path, ppo=PPOConfig(group_size=8, mini_batch_size=8), lr=5e-2)
    module.lora = LoraSettings(r=4, alpha=8, target_modules=("q_proj", "v_proj", "up_proj"))
    module.hparams.export_dir = str(tmp_path / "export")
    before = initial_weights(module)
    lora = sorted(k for k in before if "lora_" in k)
    assert len(lora) == 2 * 3  # A and B of 3 adapted layers (1 decoder layer)
    assert {n for n, p in module.model.named_parameters() if p.requires_grad} == set(lora)
    trainer(tmp_path, 6).fit(module, dm)  # 3 RL steps x 2 updates
    assert sorted(changed(before, module.model.state_dict())) == lora  # every adapter moved, nothing else
    opt_params = [p for g in module.trainer.optimizers[0].param_groups for p in g["params"]]
    assert len(opt_params) == len(lora)  # frozen base weights are not in the optimizer

    exported = load_causal_lm(str(tmp_path / "export"))
    assert not has_lora(exported) and not any("lora" in k for k in exported.state_dict())
    ids = torch.tensor([[1, 4, 5, 6, 4, 5]])
    with torch.no_grad():
        want, got = module.model.eval()(input_ids=ids).logits, exported.eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    base = {k.replace(".base_layer", ""): v for k, v in before.items() if "lora_" not in k}
    assert set(base) == set(exported.state_dict())
    assert changed(base, exported.state_dict())  # the merge folded the trained adapters into the weights


def test_merged_copy_leaves_the_adapted_model_alone():
    model = add_lora(load_causal_lm(TINY, tokenizer=char_tokenizer(list("12\n"))), LoraSettings(r=2, alpha=2))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    merged = merged_copy(model)
    assert has_lora(model) and not has_lora(merged)
    ids = torch.tensor([[1, 4, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_lora_settings_are_checked():
    with pytest.raises(ValueError, match="(?i)target.modules"):  # peft: "Target modules ... not found"
        add_lora(load_causal_lm(TINY), LoraSettings(target_modules=("no_such_module",)))
    with pytest.raises(ValueError):
        LoraSettings(r=0)
