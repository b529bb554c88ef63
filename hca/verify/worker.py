"""The ``math`` slow path: math-verify in persistent worker subprocesses, with timeouts.

``_slow_math(pred, ref)`` asks a worker (``subprocess.Popen([sys.executable, "-c", ...])``
running ``_worker_main``) over pipes and waits at most ``SLOW_TIMEOUT_S``; on an overrun it kills
and restarts the worker and answers False. Verdicts are cached. Without a working worker the
comparison runs in-process. See "Timeout design" in :mod:`hca.verify`.
"""
from __future__ import annotations

import atexit
import logging
import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import time

logger = logging.getLogger(__name__)

SLOW_TIMEOUT_S = 3.0  # per slow-path comparison (parent-side wall clock)
WORKER_START_TIMEOUT_S = 60.0  # worker start-up (imports sympy + math-verify)
WORKER_MEMORY_BYTES = 4 << 30  # RLIMIT_AS of the worker
_CACHE_MAX = 200_000
# Worker processes for the slow path: a single call uses one; batch_is_correct spreads its slow
# items over up to this many (each ~60-150 MB). Override with HCA_VERIFY_WORKERS.
try:
    NUM_WORKERS = max(1, int(os.environ.get("HCA_VERIFY_WORKERS", "0")) or min(4, os.cpu_count() or 1))
except ValueError:
    NUM_WORKERS = min(4, os.cpu_count() or 1)


_GOLD_CACHE: dict[str, list] = {}


def _mv_equal(pred_text: str, ref: str, in_process_timeouts: bool = False) -> bool:
    """math-verify comparison; runs in the worker (or in-process as a fallback)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    cfg = [LatexExtractionConfig(), ExprExtractionConfig()]
    pt = 3 if in_process_timeouts else None
    gold = _GOLD_CACHE.get(ref)
    if gold is None:
        gold = parse("\\boxed{" + ref + "}", extraction_config=cfg, parsing_timeout=pt)
        if not gold:
            gold = parse("$" + ref + "$", extraction_config=cfg, parsing_timeout=pt)
        if len(_GOLD_CACHE) > 4096:
            _GOLD_CACHE.clear()
        _GOLD_CACHE[ref] = gold
    if not gold:
        return False
    pred = parse(pred_text, extraction_config=cfg, parsing_timeout=pt)
    if not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=pt, strict=True))


def _write_msg(f, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    f.write(struct.pack("<I", len(data)) + data)
    f.flush()


def _worker_main() -> None:  # pragma: no cover - runs in the child process
    """Entry point of the worker process: reads (id, pred, ref, timeout), writes (id, bool)."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints must not corrupt the protocol
    inp = sys.stdin.buffer
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, resource.RLIM_INFINITY))
    except Exception:
        resource = None  # type: ignore[assignment]
    try:
        sys.set_int_max_str_digits(100_000)
    except AttributeError:
        pass
    _mv_equal("\\boxed{\\frac{1}{2}}", "0.5")  # import and warm up
    _write_msg(out, ("ready", os.getpid()))
    while True:
        head = inp.read(4)
        if len(head) < 4:
            return
        (n,) = struct.unpack("<I", head)
        body = inp.read(n)
        if len(body) < n:
            return
        req_id, pred, ref, timeout_s = pickle.loads(body)
        if resource is not None:
            try:  # orphan guard: a request may use at most ~2x its timeout of CPU time
                used = resource.getrusage(resource.RUSAGE_SELF)
                cpu = used.ru_utime + used.ru_stime
                soft = int(cpu + 2 * timeout_s + 2)
                resource.setrlimit(resource.RLIMIT_CPU, (soft, resource.RLIM_INFINITY))
            except Exception:
                pass
        try:
            res = _mv_equal(pred, ref)
        except BaseException:  # noqa: BLE001 - MemoryError, RecursionError, sympy internals
            res = False
        _write_msg(out, (req_id, bool(res)))


class _WorkerDead(Exception):
    pass


class _Worker:
    """One math-verify worker subprocess, driven over pipes. Not thread-safe: hold its slot's lock."""

    def __init__(self) -> None:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        code = (
            "import sys; sys.path.insert(0, {!r}); "
            "from hca.verify.worker import _worker_main; _worker_main()".format(root)
        )
        env = dict(os.environ)
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[k] = "1"
        self.owner_pid = os.getpid()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            close_fds=True,
            start_new_session=True,  # no SIGINT from the parent's terminal
            env=env,
        )
        self.fd = self.proc.stdout.fileno()
        self.buf = b""
        self.ready = False
        self.next_id = 0

    def _read_msg(self, deadline: float):
        while True:
            if len(self.buf) >= 4:
                (n,) = struct.unpack("<I", self.buf[:4])
                if len(self.buf) >= 4 + n:
                    body, self.buf = self.buf[4 : 4 + n], self.buf[4 + n :]
                    return pickle.loads(body)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            r, _, _ = select.select([self.fd], [], [], remaining)
            if not r:
                raise TimeoutError
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                raise _WorkerDead
            self.buf += chunk

    def wait_ready(self, timeout: float) -> None:
        if not self.ready:
            msg = self._read_msg(time.monotonic() + timeout)
            if not (isinstance(msg, tuple) and msg and msg[0] == "ready"):
                raise _WorkerDead
            self.ready = True

    def request(self, pred: str, ref: str, timeout: float) -> bool:
        self.next_id += 1
        rid = self.next_id
        try:
            _write_msg(self.proc.stdin, (rid, pred, ref, timeout))
        except (BrokenPipeError, OSError, ValueError) as e:
            raise _WorkerDead from e
        deadline = time.monotonic() + timeout
        while True:
            msg = self._read_msg(deadline)
            if isinstance(msg, tuple) and len(msg) == 2 and msg[0] == rid:
                return bool(msg[1])

    def kill(self) -> None:
        if os.getpid() != self.owner_pid:
            return
        try:
            self.proc.kill()
        except Exception:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except Exception:
                pass
        try:
            self.proc.wait(timeout=5)
        except Exception:
            pass


class _Slot:
    """One worker process and the lock that serialises its use."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.worker: _Worker | None = None


_SLOTS: list[_Slot] = [_Slot() for _ in range(NUM_WORKERS)]
_WORKER_BROKEN = False
_CACHE: dict[tuple[str, str], bool] = {}


def _reset_after_fork() -> None:
    # the parent's workers stay the parent's; the child starts its own when it needs them.
    # In place, so that ``hca.verify._SLOTS`` (a re-export) stays this list.
    _SLOTS[:] = [_Slot() for _ in range(NUM_WORKERS)]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _live_worker(slot: _Slot) -> _Worker | None:
    """The slot's worker, (re)started if needed, not necessarily ready. Hold ``slot.lock``."""
    global _WORKER_BROKEN
    if _WORKER_BROKEN:
        return None
    w = slot.worker
    if w is not None and (w.owner_pid != os.getpid() or w.proc.poll() is not None):
        w.kill()
        w = slot.worker = None
    if w is None:
        try:
            w = slot.worker = _Worker()
        except Exception:
            logger.warning("hca.verify: cannot start a math-verify worker; verifying in-process",
                           exc_info=True)
            _WORKER_BROKEN = True
            return None
    return w


def _ready_worker(slot: _Slot) -> _Worker | None:
    """The slot's worker once it is ready, or None (then verify in-process). Hold ``slot.lock``."""
    global _WORKER_BROKEN
    w = _live_worker(slot)
    if w is None:
        return None
    try:
        w.wait_ready(WORKER_START_TIMEOUT_S)
        return w
    except (TimeoutError, _WorkerDead):
        w.kill()
        slot.worker = None
        _WORKER_BROKEN = True
        logger.warning("hca.verify: the math-verify worker did not start; verifying in-process")
        return None


def _acquire_slot() -> _Slot:
    """A free slot if there is one (lowest index first, so one caller uses one worker), else
    wait for the slot of this thread's hash."""
    slots = _SLOTS
    for s in slots:
        if s.lock.acquire(blocking=False):
            return s
    s = slots[threading.get_ident() % len(slots)]
    s.lock.acquire()
    return s


def start_worker(wait: bool = True, n: int = 1) -> bool:
    """Start ``n`` (at most ``NUM_WORKERS``) math workers now, optionally waiting until they are
    ready. True if they run (False: the slow path will run in-process)."""
    ok = True
    for slot in _SLOTS[: max(1, min(n, len(_SLOTS)))]:
        with slot.lock:
            w = _ready_worker(slot) if wait else _live_worker(slot)
            ok = ok and w is not None
    return ok


def shutdown_worker() -> None:
    """Stop the workers (a later slow-path call starts new ones)."""
    for slot in _SLOTS:
        with slot.lock:
            if slot.worker is not None:
                slot.worker.kill()
                slot.worker = None


def _atexit_shutdown() -> None:
    for slot in _SLOTS:
        if slot.worker is not None:
            slot.worker.kill()


atexit.register(_atexit_shutdown)


def _in_process(pred: str, ref: str) -> bool:
    on_main = threading.current_thread() is threading.main_thread()
    try:
        return _mv_equal(pred, ref, in_process_timeouts=on_main)
    except Exception:
        return False


def _slow_math(pred: str, ref: str, timeout: float | None = None) -> bool:
    """math-verify's verdict, from a worker process, bounded by ``timeout`` (cached)."""
    key = (pred, ref)
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    timeout = SLOW_TIMEOUT_S if timeout is None else timeout
    res = False
    slot = _acquire_slot()
    try:
        for _attempt in range(2):
            w = _ready_worker(slot)
            if w is None:
                res = _in_process(pred, ref)
                break
            try:
                res = w.request(pred, ref, timeout)
                break
            except TimeoutError:
                logger.debug("hca.verify: slow path timed out; restarting the worker")
                w.kill()
                slot.worker = None
                _live_worker(slot)  # restart now, in the background: warm for the next call
                res = False
                break
            except _WorkerDead:  # crashed (e.g. a resource limit): one retry on a fresh worker
                w.kill()
                slot.worker = None
                res = False
    finally:
        slot.lock.release()
    if len(_CACHE) >= _CACHE_MAX:
        _CACHE.clear()
    _CACHE[key] = res
    return res


def _slow_math_many(items: list[tuple[str, str]]) -> list[bool]:
    """``_slow_math`` over many pairs, spread over up to ``NUM_WORKERS`` workers."""
    todo = list(dict.fromkeys(k for k in items if k not in _CACHE))
    if len(todo) > 1 and len(_SLOTS) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(len(_SLOTS), len(todo))) as ex:
            list(ex.map(lambda k: _slow_math(*k), todo))
    return [_slow_math(p, r) for p, r in items]
