"""The batch pipeline, independent of the engine: records in, `infer(record, defaults)` calls,
output files out.

Threads:
  feeder      reads every input file in order, skips records already in its journal, queues the
              rest (bounded queue: memory stays flat however large the input)
  workers     `concurrency` threads, each blocking in infer() for one record (the engine batches
              all records in flight)
  writer      appends finished records to their file's journal and fsyncs in groups; a file whose
              records are all journalled goes to
  finalizer   assembles `<name>.out` in input order from the journal, publishes it atomically,
              writes a done marker and drops the journal
Records never wait for each other across files, so many small files keep the engine as busy
as one large file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from serve import encoders as enc
from serve.batch import fileio
from serve.batch.journal import Journal
from serve.batch.progress import Progress
from serve.batch.records import render

log = logging.getLogger("serve.batch")

# (record text, defaults) -> response object for that line (never raises; errors are objects)
InferFn = Callable[[str, "dict | None"], object]


@dataclass(frozen=True)
class BatchJob:
    input: str
    output: str
    work_dir: str
    defaults: dict = field(default_factory=dict)  # parameters under each record's own
    join_input: bool = False
    seed: int = 0  # base of the per-record seeds (see records.seed_for)
    concurrency: int = 64
    model_name: str = ""
    progress: str = "auto"


class _File:
    def __init__(self, f: fileio.InputFile, out_uri: str, journal: Journal):
        self.f, self.out_uri, self.journal = f, out_uri, journal
        self.lock = threading.Lock()
        self.total: int | None = None  # known once the feeder reached the end of the file
        self.queued = False  # handed to the finalizer

    def complete(self) -> bool:
        with self.lock:
            if self.total is None or self.queued or len(self.journal.entries) < self.total:
                return False  # cheap test first: this runs after every group commit
            if any(i not in self.journal.entries for i in range(self.total)):
                return False
            self.queued = True
            return True


def fingerprint(job: BatchJob, f: fileio.InputFile) -> str:
    key = {"v": 1, "input": f.rel, "identity": f.identity, "defaults": job.defaults,
           "join": job.join_input, "seed": job.seed, "model": job.model_name}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


class BatchRun:
    def __init__(self, job: BatchJob, infer: InferFn):
        self.job, self.infer = job, infer
        self.work_q: queue.Queue = queue.Queue(maxsize=max(2 * job.concurrency, 16))
        self.result_q: queue.Queue = queue.Queue()
        self.final_q: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.cond = threading.Condition()
        self.open_files = 0  # opened by the feeder, not yet finalized or failed
        self.feeder_done = False
        self.files_done: list[str] = []
        self.files_failed: dict[str, str] = {}
        self.progress = Progress(job.progress)

    # ---- bookkeeping -------------------------------------------------------------------------
    def _closed(self, rel: str, error: str | None = None) -> None:
        with self.cond:
            if error is None:
                self.files_done.append(rel)
            else:
                self.files_failed[rel] = error
            self.open_files -= 1
            self.cond.notify_all()

    def _marker(self, rel: str) -> str:
        return os.path.join(self.job.work_dir, *rel.split("/")) + ".done"

    # ---- threads -----------------------------------------------------------------------------
    def _feed(self, files: list[fileio.InputFile]) -> None:
        for f in files:
            if self.stop.is_set():
                break
            out_uri = fileio.output_uri(self.job.output, f.rel)
            fp = fingerprint(self.job, f)
            done = _read_marker(self._marker(f.rel))
            if done.get("fingerprint") == fp and fileio.output_exists(out_uri):
                log.info("%s: already done (%s)", f.rel, out_uri)
                if not self.progress.total_final:
                    self.progress.add_total(done["records"])
                self.progress.add_done(done["records"], done["errors"], resumed=True)
                with self.cond:
                    self.files_done.append(f.rel)
                continue
            with self.cond:
                self.open_files += 1
            try:
                st = _File(f, out_uri, Journal(self._marker(f.rel)[: -len(".done")] + ".journal", fp))
                if st.journal.entries:
                    log.info("%s: resuming, %d records already journalled", f.rel, len(st.journal.entries))
                n = 0
                for n, raw in enumerate(fileio.iter_records(f), start=1):
                    if not self.progress.total_final:
                        self.progress.add_total(1)
                    e = st.journal.entries.get(n - 1)
                    if e is not None:
                        self.progress.add_done(1, int(e.error), resumed=True)
                    else:
                        self._put((st, n - 1, raw))
                    if self.stop.is_set():
                        raise InterruptedError("stopped")
                with st.lock:
                    st.total = n
                if st.complete():
                    self.final_q.put(st)
            except Exception as e:  # one unreadable input fails that file only
                if not isinstance(e, InterruptedError):
                    log.error("%s: reading failed: %s", f.rel, e)
                self._closed(f.rel, f"read: {e}")
        with self.cond:
            self.feeder_done = True
            self.cond.notify_all()

    def _put(self, item) -> None:
        while not self.stop.is_set():
            try:
                self.work_q.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _work(self) -> None:
        while not self.stop.is_set():
            try:
                st, index, raw = self.work_q.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                line, error, tokens = render(self.infer, self.job, st.f.rel, index, raw, st.f.mtime)
            except Exception as e:  # infer() must not raise; if it does, that record is an error line
                log.exception("%s:%d: unexpected failure", st.f.rel, index)
                status, body = enc.error_of(e)
                line = json.dumps({**body, "status": status}).encode()
                error, tokens = True, 0
            self.result_q.put((st, index, line, error, tokens))

    def _write(self) -> None:
        while True:
            items = [self.result_q.get()]
            while len(items) < 4096:
                try:
                    items.append(self.result_q.get_nowait())
                except queue.Empty:
                    break
            touched: dict[int, _File] = {}
            for it in items:
                if it is None:
                    continue
                st, index, line, error, tokens = it
                st.journal.append(index, line, error, tokens)
                touched[id(st)] = st
            for st in touched.values():
                st.journal.sync()  # group commit: durable before counted
            for it in items:
                if it is not None:
                    self.progress.add_done(1, int(it[3]), it[4])
            for st in touched.values():
                if st.complete():
                    self.final_q.put(st)
            if any(it is None for it in items):
                return

    def _finalize_loop(self) -> None:
        while (st := self.final_q.get()) is not None:
            try:
                n = self._finalize(st)
                log.info("%s: wrote %d lines to %s", st.f.rel, n, st.out_uri)
                self._closed(st.f.rel)
            except Exception as e:
                log.error("%s: writing the output failed: %s", st.f.rel, e)
                self._closed(st.f.rel, f"write: {e}")

    def _finalize(self, st: _File) -> int:
        j, total = st.journal, st.total
        staged = fileio.staging_path(st.out_uri, self.job.work_dir, st.f.rel)
        os.makedirs(os.path.dirname(staged) or ".", exist_ok=True)
        if not fileio.s3io.is_s3(st.out_uri):
            os.makedirs(os.path.dirname(st.out_uri) or ".", exist_ok=True)
            fileio.clean_staging(st.out_uri)
        errors = tokens = 0
        with open(staged, "wb") as out:
            for i in range(total):
                e = j.entries[i]
                out.write(j.read(e) + b"\n")
                errors += e.error
                tokens += e.tokens
            out.flush()
            os.fsync(out.fileno())
        fileio.publish(staged, st.out_uri)
        marker = {"fingerprint": j.fingerprint, "records": total, "errors": errors, "tokens": tokens,
                  "output": st.out_uri}
        fileio.write_small(self._marker(st.f.rel), json.dumps(marker).encode())
        j.remove()
        return total

    # ---- driver ------------------------------------------------------------------------------
    def run(self) -> dict:
        job = self.job
        files = fileio.list_inputs(job.input)
        log.info("batch: %d input file(s) under %s -> %s (work dir %s, %d in flight)",
                 len(files), job.input, job.output, job.work_dir, job.concurrency)
        if not fileio.s3io.is_s3(job.input):
            self.progress.add_total(sum(sum(1 for _ in fileio.iter_records(f)) for f in files))
            self.progress.total_final = True
        threads = [threading.Thread(target=self._feed, args=(files,), name="batch-feed", daemon=True)]
        threads += [threading.Thread(target=self._work, name=f"batch-w{i}", daemon=True)
                    for i in range(job.concurrency)]
        writer = threading.Thread(target=self._write, name="batch-journal", daemon=True)
        finalizer = threading.Thread(target=self._finalize_loop, name="batch-final", daemon=True)
        for t in [*threads, writer, finalizer]:
            t.start()
        finished = False
        try:
            with self.cond:
                while not (self.feeder_done and self.open_files == 0) and not self.stop.is_set():
                    self.cond.wait(timeout=1.0)
                    self.progress.total_final = self.progress.total_final or self.feeder_done
                    self.progress.tick()
            finished = True
        finally:
            self.stop.set()  # idle workers/feeder leave; a record in infer() finishes first
            for t in threads[1:]:
                t.join(None if finished else 5.0)  # interrupted: records still running are re-run next time
            self.result_q.put(None)
            writer.join()
            self.final_q.put(None)
            finalizer.join()
            self.progress.close()
        summary = self.summary(len(files))
        if finished:
            fileio.write_small(summary_uri(job.output), json.dumps(summary, indent=1).encode() + b"\n")
        return summary

    def summary(self, n_files: int) -> dict:
        p = self.progress
        wall = time.monotonic() - p.start
        fresh = p.done - p.resumed
        return {"input": self.job.input, "output": self.job.output, "model": self.job.model_name,
                "files": n_files, "files_done": len(self.files_done), "files_failed": self.files_failed,
                "records": p.done, "records_this_run": fresh, "records_resumed": p.resumed,
                "errors": p.errors, "generated_tokens_this_run": p.tokens, "wall_s": round(wall, 3),
                "records_per_s": round(fresh / max(wall, 1e-9), 3),
                "tokens_per_s": round(p.tokens / max(wall, 1e-9), 3)}


def summary_uri(output: str) -> str:
    return output.rstrip("/") + "/_SUMMARY.json" if fileio.s3io.is_s3(output) else os.path.join(output, "_SUMMARY.json")


def _read_marker(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return {}
