"""Prover-labeled trajectory collection as Lightning ``predict`` (METHOD.md section 8.1).

Thin: both models are built frozen in ``configure_model``; ``predict_step`` hands one
:class:`~hca.datamodules.problems.ProblemChunk` to :func:`hca.collection.labelling.label_chunk` and returns
``(chunk_id, records, stats)`` for :class:`hca.collection.writer.TrajectoryWriter` to write.

    python train.py predict --config configs/collect/arithmetic.yaml
"""
from __future__ import annotations

import warnings

import lightning as L
import torch

from hca.collection.labelling import CollectionConfig, label_chunk
from hca.data.prompts import PromptFormat, context_length, render_problems, rendered_prompts
from hca.data.trajectories import FORMAT_VERSION
from hca.models.identity import model_identity
from hca.models.loading import load_causal_lm, load_tokenizer
from hca.rollout.engines import EngineConfig
from hca.runtime.hparams import store_plain_hparams


def check_model_ref(name: str, role: str) -> None:
    """Fail clearly on a local checkpoint path that does not exist (``org/name`` with a single slash
    is taken for a hub name; ``tiny-llama...`` specs build a fresh model). Called at the writer's
    setup, before any model is loaded or anything sampled."""
    from pathlib import Path

    from hca.models.loading import is_tiny_spec

    if is_tiny_spec(name) or Path(name).is_dir():
        return
    from hca.models.gguf import check_gguf_file, is_gguf_ref

    if is_gguf_ref(name):
        check_gguf_file(name)  # a clear error when missing or not GGUF
        return
    looks_local = name.startswith((".", "/", "~")) or name.count("/") != 1 or Path(name.split("/")[0]).is_dir()
    if looks_local:
        raise FileNotFoundError(f"{role} checkpoint not found: {name!r} (no such folder; train it first, e.g. "
                                f"python train.py fit --config configs/sft/arithmetic.yaml, or give a hub name / "
                                f"tiny-llama spec)")


def _warn_same(prover: str) -> None:
    warnings.warn(f"the prover is the policy ({prover!r}): with mu = pi the progress term adds nothing new to the "
                  "outcome gradient (METHOD.md section 3); use a distinct prover checkpoint or best_of_k > 1",
                  UserWarning, stacklevel=3)


class CollectorModule(L.LightningModule):
    def __init__(self, policy: str, prover: str, policy_tokenizer: str | None = None,
                 prover_tokenizer: str | None = None, dtype: str = "float32",
                 collection: CollectionConfig | None = None, engine: EngineConfig | None = None, seed: int = 0,
                 num_threads: int | None = None, progress: bool = True, prompt: PromptFormat | None = None):
        """
        Args:
            policy: the policy pi: local HF folder, hub name, or ``tiny-llama[:k=v,...]``.
            prover: the prover mu (same forms); should differ from the policy (METHOD.md section 3).
            policy_tokenizer: tokenizer of the policy; defaults to ``policy``.
            prover_tokenizer: tokenizer of the prover; defaults to ``prover``.
            dtype: parameter dtype of both models (``float32``, ``bfloat16``).
            collection: responses, rollouts, sampling, delimiter, prover transform, first pit, dedupe.
            engine: the rollout engine of both models (``hf | vllm | auto``, :class:`hca.rollout.engines.EngineConfig`;
                with vLLM, prefix caching shares the KV of a prefix among its M prover completions).
                The resolved engine is part of the collection's identity: a folder resumes on the engine it began with.
            seed: collection seed; every chunk's sampling seeds derive from (seed, chunk id).
            num_threads: torch intra-op threads per process (None: leave torch's default).
            progress: show the engines' progress bars inside a chunk (when it spans several sub-batches).
            prompt: how native problem lines become prompts, with the policy's tokenizer (:mod:`hca.data.prompts`);
                the resolved format is written to the manifest (``identity.module.prompt_format``).
        """
        super().__init__()
        self.save_hyperparameters()
        self.prompt = PromptFormat.coerce(prompt)
        store_plain_hparams(self, prompt=self.prompt)  # plain types: checkpoints load with weights_only=True
        if isinstance(collection, dict):
            collection = CollectionConfig(**collection)
        self.cfg = collection or CollectionConfig()
        self.engine_config = EngineConfig.coerce(engine, "model.init_args.engine")
        store_plain_hparams(self, engine=self.engine_config)
        if policy == prover and self.cfg.best_of_k == 1:  # best-of-K of the policy is another prover (PAV)
            _warn_same(prover)
        self._ids = None  # (policy identity, prover identity), computed on first use (hashes the folders)
        self.policy_model = self.prover_model = None
        self._engines = None

    def model_identities(self) -> tuple[dict, dict]:
        """Identity (hca.models.identity.model_identity) of the policy and the prover; checks that
        local checkpoints exist and warns when the prover has the policy's content hash."""
        if self._ids is None:
            hp = self.hparams
            check_model_ref(hp.policy, "policy")
            check_model_ref(hp.prover, "prover")
            self._ids = (model_identity(hp.policy), model_identity(hp.prover))
            if (hp.policy != hp.prover and self.cfg.best_of_k == 1 and self._ids[0]["sha256"]
                    and self._ids[0]["sha256"] == self._ids[1]["sha256"]):
                _warn_same(hp.prover)
        return self._ids

    def configure_model(self) -> None:
        if self.policy_model is not None:
            return
        hp = self.hparams
        self.model_identities()
        if hp.num_threads:
            torch.set_num_threads(hp.num_threads)
        self.policy_tok = self.policy_tokenizer()
        self.prover_tok = load_tokenizer(hp.prover_tokenizer or hp.prover)
        kinds = self.engine_kinds()
        # vLLM loads its own copy: a torch model is built only for the HF engine
        self.policy_model = (load_causal_lm(hp.policy, hp.dtype, tokenizer=self.policy_tok).requires_grad_(False).eval()
                             if kinds["policy"] == "hf" else torch.nn.Module())
        self.prover_model = (load_causal_lm(hp.prover, hp.dtype, tokenizer=self.prover_tok).requires_grad_(False).eval()
                             if kinds["prover"] == "hf" else torch.nn.Module())

    def engine_kinds(self) -> dict[str, str]:
        """``{"policy": "hf" | "vllm", "prover": ...}``: the engine each model samples with."""
        if getattr(self, "_kinds", None) is None:
            from hca.rollout.engines import resolve_engine

            setting = "model.init_args.engine"
            self._kinds = {"policy": resolve_engine(self.engine_config, self.hparams.policy, setting),
                           "prover": resolve_engine(self.engine_config, self.hparams.prover, setting)}
        return self._kinds

    def policy_tokenizer(self):
        if getattr(self, "policy_tok", None) is None:
            self.policy_tok = load_tokenizer(self.hparams.policy_tokenizer or self.hparams.policy)
        return self.policy_tok

    def engines(self):
        """``(policy_engine, prover_engine)`` over the models on their current device."""
        if self._engines is None:
            from hca.rollout.engines import build_engine

            self.configure_model()
            hp, cfg, setting = self.hparams, self.engine_config, "model.init_args.engine"
            if self.trainer_world_size() > 1 and "vllm" in self.engine_kinds().values():
                raise ValueError(f"{setting}: vllm runs on one rank only for now; collect on one rank or with {setting}: hf")
            needs = (self.context_needs() if "vllm" in self.engine_kinds().values() and cfg.max_model_len is None
                     else {"policy": None, "prover": None})
            self._engines = (build_engine(cfg, hp.policy, self.policy_tok, model=self.policy_model, dtype=hp.dtype,
                                          setting=setting, context_need=needs["policy"]),
                             build_engine(cfg, hp.prover, self.prover_tok, model=self.prover_model, dtype=hp.dtype,
                                          setting=setting, context_need=needs["prover"]))
        return self._engines

    def context_needs(self) -> dict[str, tuple[int, int] | None]:
        """``{"policy": (longest prompt, response budget), "prover": ...}`` in each model's tokens,
        which size a vLLM engine's context when ``engine.max_model_len`` is unset: the prompts are
        the predict datamodule's problems rendered in the policy's format; the policy samples its
        budget after them, the prover completes ``prompt + a prefix of a policy response``
        (:func:`hca.collection.labelling.estimate_prefix_values`) with its own budget
        (:func:`hca.rollout.sizing.continuation_need`). One model in both roles gets the larger
        need for both (one engine). None each without such a datamodule (the model's context)."""
        from hca.rollout.sizing import continuation_need, sampling_need

        dm = self.trainer.datamodule if self._trainer is not None else None
        problems = getattr(dm, "problems", None)
        if not problems:
            return {"policy": None, "prover": None}
        hp = self.hparams
        prompts = rendered_prompts(problems, self.prompt, self.policy_tokenizer())
        policy_budget, prover_budget = self.cfg.policy.max_new_tokens, self.cfg.prover.max_new_tokens
        prover = continuation_need(prompts, self.policy_tok, policy_budget, self.prover_tok, prover_budget)
        same = hp.policy == hp.prover and (hp.policy_tokenizer or hp.policy) == (hp.prover_tokenizer or hp.prover)
        policy = prover if same else sampling_need(prompts, self.policy_tok, policy_budget)
        return {"policy": policy, "prover": prover}

    def trainer_world_size(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def context_limits(self) -> list[int]:
        """Context lengths of both models (the prompts must fit both)."""
        out = []
        for model, engine in zip((self.policy_model, self.prover_model), self.engines()):
            n = getattr(engine, "max_model_len", None) or context_length(model)
            if n:
                out.append(n)
        return out

    def identity(self) -> dict:
        """What fixes the records given the chunks (compared on resume; written to the manifest)."""
        hp = self.hparams
        policy_id, prover_id = self.model_identities()
        kinds = self.engine_kinds()
        engine = {"policy": kinds["policy"], "prover": kinds["prover"]}  # the samples depend on the engine and ...
        if "hf" in kinds.values():
            engine["max_batch_size"] = self.engine_config.max_batch_size  # ... on the HF engine's sub-batching
        if "vllm" in kinds.values():  # ... and on vLLM's dtype and context length (the setting: None sizes it by
            cfg = self.engine_config  # the problems and budgets, which the rest of the identity fixes)
            engine["vllm"] = {"dtype": cfg.dtype or hp.dtype, "max_model_len": cfg.max_model_len}
        return {"format": FORMAT_VERSION, "policy": policy_id, "prover": prover_id,
                "policy_tokenizer": hp.policy_tokenizer, "prover_tokenizer": hp.prover_tokenizer, "dtype": hp.dtype,
                "collection": self.cfg.to_dict(), "engine": engine, "seed": hp.seed,
                "prompt_format": self.prompt.describe(self.policy_tokenizer())}

    def on_predict_start(self) -> None:
        self._engines = None  # the models may have moved since the engines were built

    def predict_step(self, batch, batch_idx: int = 0):
        if batch.chunk_id < 0:  # placeholder: this rank has nothing (left) to do
            return batch.chunk_id, [], None
        policy_engine, prover_engine = self.engines()
        problems, skipped = render_problems(batch.problems, self.prompt, self.policy_tok,
                                            min(self.context_limits(), default=None))
        records, stats = label_chunk(problems, policy_engine, prover_engine, self.cfg, self.hparams.seed,
                                     chunk_id=batch.chunk_id, progress=self.hparams.progress)
        stats.prompts_skipped = len(skipped)
        return batch.chunk_id, records, stats

    def forward(self, *args, **kwargs):
        raise NotImplementedError("CollectorModule only predicts: python train.py predict --config ...")
