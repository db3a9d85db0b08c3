"""One training run's folder OUT, as train.py's two loops use it, call by call:

    with Run(out, ...) as run:            # locks OUT (OUT/.lock) until the block ends; refuses an OUT holding a run
        start = run.begin(objects)        # --resume: restore OUT/latest; --overwrite: delete the old run; config.json
        for step, batch in enumerate(run.batches(loader), start):
            ...                           # one training step
            run.log(step + 1, terms)      # JSONL row every log_every steps, progress bar
            run.checkpoint(step + 1, objects)   # when due: every ckpt_every steps and at the last

Leaving the `with` block by Ctrl-C prints one line naming the last good checkpoint (exit code 130); a write that
fails (read-only folder, disk full) is one line naming it and the last good checkpoint.
"""
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from runtime.checkpoint import latest_checkpoint, load_checkpoint, remove_run, run_files, save_checkpoint
from runtime.distributed import global_mean
from runtime.errors import InputError, worker_errors
from runtime.files import (atomic_write, lock_folder, open_own, refuse_link, remove_path, remove_temporaries, save_json,
                           writing)


class Run:
    """The output folder of one run of `stage` (its EMA model exported to OUT/`export`), training steps 0..`stop`.
    Rank 0 holds OUT's lock (files.lock_folder) from here to the end of the `with` block: a second run into OUT is
    refused while this one lives. `check_config(saved, path)` refuses to resume from a checkpoint of another run
    config. OUT holding another run is refused unless `resume` (continue it) or `overwrite` (delete it first);
    nothing in OUT but the lock file changes before `begin`."""

    def __init__(self, out, stage: str, export: str, run_config: dict, check_config, stop: int, *, resume: bool,
                 overwrite: bool, log_every: int, ckpt_every: int, rank: int, world: int, device):
        self.out, self.stage, self.export, self.run_config = Path(out), stage, export, run_config
        self.check_config, self.stop, self.resume, self.overwrite = check_config, stop, resume, overwrite
        self.log_every, self.ckpt_every = log_every, ckpt_every
        self.rank, self.world, self.device = rank, world, device
        self.last_ckpt, self.ckpts, self.done, self.bar, self.seen = None, [], None, None, 0
        self.kept = []  # (step, terms) of the steps since the last row: read once per row (`read_terms`)
        self.lock = lock_folder(self.out) if rank == 0 else None  # before looking: two runs never both see it free
        try:
            if resume:  # refused here, before anything is written: no checkpoint, or one of another config
                self.last_ckpt = latest_checkpoint(self.out, check_config)
            elif not overwrite:
                self.refuse_held_run()
        except BaseException:
            self.release()
            raise

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, kind, error, tb):
        self.release()
        if self.bar is not None:
            self.bar.close()
        if kind is KeyboardInterrupt:  # Ctrl-C: one line saying what to resume from, not a traceback
            if self.rank == 0:
                print(self.interrupted(), file=sys.stderr)
            raise SystemExit(130) from None
        return False

    def release(self) -> None:
        """Releases OUT's lock (rank 0)."""
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None

    def writing(self, path):
        """A context in which a failed write of `path` is one InputError naming it and the last good checkpoint."""
        return writing(path, f"; {self.last_good()}")

    def refuse_held_run(self) -> None:
        """Refuses an OUT that holds another run's checkpoints, log or exported model."""
        latest, ckpts = self.out / "latest", sorted(p.name for p in self.out.glob("step-*"))
        if latest.is_file():
            raise InputError(f"{self.out}: holds a run (latest {latest.read_text().strip()}); continue it with "
                             "--resume, or start over with --overwrite")
        held = ckpts[-1:] or [p.name for p in (self.out / "log.jsonl", self.out / self.export) if p.exists()]
        if held:
            raise InputError(f"{self.out}: holds a run's files ({held[0]}) but no latest checkpoint; start over "
                             "with --overwrite")

    def begin(self, objects: dict) -> int:
        """The first step: with `resume`, the step of OUT/latest, into which `objects` (modules, optimizers,
        schedulers) are restored and after which the log is trimmed; else 0, after `overwrite` deleted the old run.
        Refuses a symbolic link where the log or the exported model goes (--overwrite deletes it, as the old run's),
        deletes the temporary files a killed write left in OUT, writes OUT/config.json and opens the progress bar."""
        start = 0
        if self.resume:
            start = load_checkpoint(self.out, objects, self.check_config, self.device)
            self.last_ckpt = self.out / f"step-{start:07d}"
            self.ckpts = [self.last_ckpt]
        if self.rank == 0:
            with self.writing(self.out):
                remove_run(self.out, run_files(self.out, self.export) if self.overwrite else [])
                for own in (self.out / "log.jsonl", self.out / self.export):  # before step 0, not when first written
                    refuse_link(own)
                self.remove_stale()
                if self.resume:
                    self.trim_log(start)
                save_json(self.run_config, self.out / "config.json")
        self.bar = tqdm(total=self.stop, initial=start, disable=self.rank != 0, desc=self.stage, dynamic_ncols=True)
        self.done, self.t0 = start, time.perf_counter()
        return start

    def batches(self, loader):
        """The loader's batches; bad data met mid-run (a truncated image, from a worker) is one InputError line that
        names the last good checkpoint."""
        try:
            yield from worker_errors(loader)
        except InputError as e:
            raise type(e)(f"{e}; {self.last_good()}") from None

    def log(self, step: int, terms: dict, batch_size: int, name: str = "img_per_s") -> None:
        """Marks `step` done and keeps its `terms` (numbers, or tensors left on the device: no host sync per step);
        every log_every steps (and at the last) reads the kept terms (`read_terms`: a non-finite one stops the run)
        and writes this step's, the mean over ranks, with throughput `name` (and peak GPU memory on CUDA) to
        OUT/log.jsonl and the progress bar."""
        self.done, self.seen = step, self.seen + batch_size
        self.bar.update(1)
        self.kept.append((step, terms))
        if step % self.log_every and step != self.stop:
            return
        row = {"step": step, **{k: float(f"{v:.6g}") for k, v in self.read_terms().items()},
               name: round(self.seen / (time.perf_counter() - self.t0), 2)}
        if self.device.type == "cuda":
            row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2 ** 30, 2)
        self.write_log(row)
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k != "step"}, refresh=False)

    def write_log(self, row: dict) -> None:
        """Appends `row` to OUT/log.jsonl (rank 0)."""
        if self.rank == 0:
            path = self.out / "log.jsonl"
            with self.writing(path), open(open_own(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a") as f:
                f.write(json.dumps(row) + "\n")

    def read_terms(self) -> dict:
        """The terms `log` kept since the last read, as floats averaged over ranks in one all-reduce and one host
        sync; stops the run at the first of these steps with a non-finite term (`check_finite`: NaN on any rank is
        NaN in the mean, so every rank stops). Returns the last step's terms. Every rank calls it at the same steps."""
        kept, self.kept = self.kept, []
        if not kept:
            return {}
        flat = [v.detach().reshape(()).to(self.device, torch.float32) if torch.is_tensor(v)
                else torch.full((), v, dtype=torch.float32, device=self.device)
                for _, terms in kept for v in terms.values()]
        values, at = global_mean(torch.stack(flat), self.world).tolist(), 0
        for step, terms in kept:
            read, at = dict(zip(terms, values[at:at + len(terms)])), at + len(terms)
            self.check_finite(step - 1, read)  # step - 1: the step's index, as the error has always named it
        return read

    def check_finite(self, step: int, terms: dict) -> None:
        """Stops the run at a non-finite loss, naming the terms and the last good checkpoint."""
        bad = [k for k, v in terms.items() if not math.isfinite(float(v))]
        if bad:
            raise FloatingPointError(
                f"non-finite loss at step {step}: " + ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
                + f"; {self.last_good()}")

    def checkpoint(self, step: int, objects: dict) -> None:
        """Every ckpt_every steps and at the last: reads the kept terms (every rank), then on rank 0 writes checkpoint
        `step` of `objects` and removes this run's checkpoints (or the resumed one) but the newest 2, never a
        checkpoint some other run left."""
        if step % self.ckpt_every and step != self.stop:
            return
        self.read_terms()  # every rank: no checkpoint holds weights that a non-finite step reached
        if self.rank != 0:
            return
        try:
            self.last_ckpt = save_checkpoint(self.out, step, objects, self.run_config)
        except InputError as e:
            raise InputError(f"{e}; {self.last_good()}") from None
        self.ckpts.append(self.last_ckpt)
        for old in self.ckpts[:-2]:
            shutil.rmtree(old, ignore_errors=True)
        self.ckpts = self.ckpts[-2:]

    def remove_stale(self) -> None:
        """Deletes what killed writes left in OUT and in its exported model folder: atomic_write's temporary files
        and unfinished checkpoint folders (OUT is locked: no live run is writing them)."""
        for folder in (self.out, self.out / self.export):
            remove_temporaries(folder)
        for tmp in self.out.glob(".tmp-step-*"):
            remove_path(tmp)

    def export_model(self, model, *meta) -> None:
        """On rank 0: the EMA model in `save_pretrained` form, OUT/`export` (`meta`: DiT.save_pretrained's)."""
        if self.rank == 0:
            with self.writing(self.out / self.export):
                model.save_pretrained(self.out / self.export, *meta)

    def last_good(self) -> str:
        return f"last good checkpoint: {self.last_ckpt or 'none written yet'}"

    def interrupted(self) -> str:
        """Where a Ctrl-C stopped the run, and how to continue it."""
        where = "before the first step" if self.done is None else f"after step {self.done} of {self.stop}"
        return f"interrupted {where}; {self.last_good()}" + (" (continue with --resume)" if self.last_ckpt else "")

    def trim_log(self, start: int) -> None:
        """Drops log rows after the resumed checkpoint (and a torn last line a killed run left): the log reads as
        one uninterrupted run."""
        path = self.out / "log.jsonl"
        if not path.is_file():
            return
        with open(open_own(path, os.O_RDONLY)) as f:
            lines, rows = f.read().split("\n"), []
        for n, line in enumerate(lines, 1):
            try:
                if line.strip() and json.loads(line)["step"] <= start:
                    rows.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                if n == len(lines):  # no newline after it: the write a killed run left unfinished
                    break
                raise InputError(f"{path}:{n}: not a JSON log row with a \"step\"") from None
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(r + "\n" for r in rows)))
