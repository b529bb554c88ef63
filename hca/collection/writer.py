"""Writes collected trajectories as the chunks finish, and the manifest and summary at the end.

``TrajectoryWriter`` is a ``BasePredictionWriter`` (``write_interval="batch"``):

* ``setup``: turns Lightning's ``return_predictions`` off (records live on disk), removes temporary files left by a killed writer, and pins the collection's identity
  (problem file hash, chunking, policy/prover identity, sampling config, seed) in
  ``collection.json``; resuming into a folder made with a different identity is an error, so
  records made under different settings are never mixed;
* after each chunk: ``shard-{chunk_id:06d}.meta.json`` (the chunk's stats, the shard's sha256)
  then ``shard-{chunk_id:06d}.jsonl``, each atomically. The shard's existence marks the chunk done;
  a meta file without its shard (killed in between) is simply rewritten when the chunk is redone;
* at predict end, every rank meets at a barrier, then rank 0 writes ``manifest.json`` over all
  shards on disk (this run's and earlier runs'), prints the summary and saves ``progress_hist.png``.
"""
from __future__ import annotations

import hashlib
import time
from datetime import datetime, timezone
from pathlib import Path

from lightning.pytorch.callbacks import BasePredictionWriter

from hca.collection.labelling import ChunkStats
from hca.collection.report import format_summary, h0_values, progress_values, save_histograms_png, summarize
from hca.data.trajectories import (FORMAT_VERSION, TrajectoryFormatError, encode_shard, file_sha256, is_temporary,
                                   list_shards, read_json, read_shard, shard_meta_name, shard_name, write_bytes_atomic,
                                   write_json_atomic, write_manifest)

IDENTITY_NAME = "collection.json"
# Keys that may differ on resume without changing any record: paths (the content hashes decide).
_COSMETIC = {("data", "problems_file"), ("module", "policy", "name"), ("module", "prover", "name")}


def _comparable(identity: dict, prefix: tuple = ()) -> dict:
    out = {}
    for k, v in identity.items():
        key = prefix + (k,)
        if key in _COSMETIC and not (len(key) == 3 and identity.get("sha256") is None):
            continue
        out[k] = _comparable(v, key) if isinstance(v, dict) else v
    return out


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _diff(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}: {x!r} (folder) vs {y!r} (now)")
    return out


class TrajectoryWriter(BasePredictionWriter):
    def __init__(self, out_dir: str | None = None, histogram: bool = True, progress_bar: bool = True):
        """
        Args:
            out_dir: collection folder; None takes the datamodule's ``out_dir`` (the usual case).
            histogram: save ``progress_hist.png`` (progress and V̂(h_0) histograms) next to the manifest.
            progress_bar: a tqdm bar over this rank's problems, with ETA.
        """
        super().__init__(write_interval="batch")
        self._out_dir = out_dir
        self.histogram, self.progress_bar = histogram, progress_bar
        self.run_stats = ChunkStats()
        self._bar = None
        self._t0 = time.time()

    # ------------------------------------------------------------------ setup and identity
    def out_dir(self, trainer) -> Path:
        d = self._out_dir or getattr(trainer.datamodule, "out_dir", None)
        if d is None:
            raise ValueError("TrajectoryWriter needs out_dir (or a datamodule with out_dir)")
        return Path(d)

    def identity(self, trainer, pl_module) -> dict:
        return {"data": trainer.datamodule.identity(), "module": pl_module.identity()}

    def setup(self, trainer, pl_module, stage: str) -> None:
        out = self.out_dir(trainer)
        out.mkdir(parents=True, exist_ok=True)
        # The records are on disk: Lightning must not also keep every chunk's records in memory
        # (return_predictions defaults to on); trainer.predict then returns None.
        trainer.predict_loop.return_predictions = False
        ident = self.identity(trainer, pl_module)
        path = out / IDENTITY_NAME
        if path.exists():
            have = read_json(path)
            diffs = _diff(_comparable(have.get("identity", {})), _comparable(ident))
            if have.get("format") != FORMAT_VERSION or diffs:
                raise ValueError(f"{path}: this folder holds a collection made with other settings; resuming would mix "
                                 f"records. Differences: {'; '.join(diffs) or 'format ' + repr(have.get('format'))}. "
                                 "Use another out_dir, or delete the folder to start over.")
        if trainer.is_global_zero:
            for p in out.iterdir():
                if is_temporary(p.name):
                    p.unlink(missing_ok=True)
            if not path.exists():
                write_json_atomic(path, {"format": FORMAT_VERSION, "identity": ident})
        self.run_stats, self._t0 = ChunkStats(), time.time()

    # ------------------------------------------------------------------ per chunk
    def on_predict_start(self, trainer, pl_module) -> None:
        dm = trainer.datamodule
        todo = sum(len(c.problems) for c in dm.pending)
        done = len(list_shards(self.out_dir(trainer)))
        if trainer.is_global_zero:
            print(f"collecting into {self.out_dir(trainer)}: {len(dm.chunks)} chunks of up to "
                  f"{dm.hparams.chunk_size} problems; {done} already on disk", flush=True)
        if self.progress_bar:
            from tqdm.auto import tqdm

            desc = "collect" if trainer.world_size == 1 else f"collect[rank {trainer.global_rank}]"
            self._bar = tqdm(total=todo, desc=desc, unit="problem", position=trainer.global_rank, dynamic_ncols=True)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        chunk_id, records, stats = prediction
        if chunk_id < 0:
            return
        out = self.out_dir(trainer)
        data = encode_shard(records)
        meta = {"format": FORMAT_VERSION, "chunk_id": chunk_id, "file": shard_name(chunk_id), "records": len(records),
                "problems": len(batch.problems), "sha256": hashlib.sha256(data).hexdigest(), "stats": stats.to_dict()}
        write_json_atomic(out / shard_meta_name(chunk_id), meta)
        write_bytes_atomic(out / shard_name(chunk_id), data)
        self.run_stats = self.run_stats + stats
        if self._bar is not None:
            self._bar.update(len(batch.problems))
            st = self.run_stats
            self._bar.set_postfix(prefixes=str(st.prefixes_labeled), gens=str(st.prover_generations),
                                  acc=f"{st.correct / max(1, st.responses):.2f}", refresh=False)

    # ------------------------------------------------------------------ the end
    def on_predict_end(self, trainer, pl_module) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        trainer.strategy.barrier("hca_collect_manifest")
        if trainer.is_global_zero:
            self.finalize(trainer, pl_module)
        trainer.strategy.barrier("hca_collect_done")

    def finalize(self, trainer, pl_module) -> dict:
        """Write the manifest over every shard on disk; print the summary; save the histogram."""
        out = self.out_dir(trainer)
        dm = trainer.datamodule
        shards, records, total = [], [], ChunkStats()
        expected = {c.chunk_id: c for c in dm.chunks}
        for cid, path in sorted(list_shards(out).items()):
            if cid not in expected:
                raise TrajectoryFormatError(f"{path}: chunk {cid} is not a chunk of this collection "
                                            f"({len(expected)} chunks)")
            recs = read_shard(path)
            sha = file_sha256(path)
            meta_path = out / shard_meta_name(cid)
            meta = read_json(meta_path) if meta_path.exists() else None
            if meta is not None and meta.get("sha256") != sha:
                raise TrajectoryFormatError(f"{path}: sha256 differs from {meta_path} (the shard changed after writing)")
            stats = ChunkStats.from_dict(meta["stats"]) if meta else None
            if stats is not None:
                total = total + stats
            shards.append({"file": path.name, "chunk_id": cid, "records": len(recs),
                           "problems": len(expected[cid].problems), "sha256": sha,
                           "stats": stats.to_dict() if stats else None})
            records.extend(recs)
        missing = sorted(set(expected) - {s["chunk_id"] for s in shards})
        summary = summarize(records)
        manifest = {
            "format": FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "complete": not missing,
            "missing_chunks": missing,
            "identity": self.identity(trainer, pl_module),
            "totals": {"chunks": len(shards), "records": len(records), **summary,
                       "collection_stats": total.to_dict()},
            "shards": shards,
        }
        write_manifest(out, manifest)
        if self.histogram and records:
            save_histograms_png(out / "progress_hist.png", progress_values(records), h0_values(records),
                                title=f"{out} ({len(records)} responses)")
        print(f"\n== collection summary ({out}) ==\n" + format_summary(summary, total, self.run_stats, records)
              + f"\nmanifest: {out / 'manifest.json'}  ({len(shards)} shards, {'complete' if not missing else f'{len(missing)} chunks missing'};"
              f" this run {time.time() - self._t0:.1f} s wall)", flush=True)
        return manifest

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
