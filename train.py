"""Every stage of hca is a LightningCLI run over a YAML config:

    python train.py fit --config configs/sft/arithmetic.yaml
    python train.py fit --config configs/sft/arithmetic.yaml --trainer.max_steps 100   # override
    python train.py fit --config configs/sft/arithmetic.yaml --print_config            # show the full config
"""
from hca.workflows.cli import main

if __name__ == "__main__":
    main()
