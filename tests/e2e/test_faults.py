"""Faults: SIGKILL at random points during every writing command, and a full disk.

Each command (``merge --to gptq``, ``onnx``, ``gguf``, ``quantize``, ``train``) runs the real CLI
(``cli.main``) in a child process forked from a *zygote*: a helper process (this file run as a
script) that has already imported torch, transformers, onnx and gguf, so a child starts in
milliseconds and a random kill lands in the command's own work (reading, folding, writing,
renaming) rather than in Python's imports. Per command: one complete run measures its duration
T and gives the reference output; then several runs are killed with SIGKILL after a uniform
random delay in [0, 1.2 T]. After every run:

- the output path does not exist, or it is complete: it verifies at the weight level
  (``verify_artifact(..., runtime=False)``) or, for ``quantize``/``train``, reads back equal to
  the reference output;
- nothing but hidden ``.NAME.<pid>-<host>.*.partial`` siblings is left, and the next run removes
  those of killed processes (checked at the end: no siblings at all);
- the inputs are unchanged (sha256 of every input file before and after).

Disk full: the output goes to a 8 KiB tmpfs (or, where mounting is not permitted, the child runs
under ``RLIMIT_FSIZE`` with SIGXFSZ ignored); the command must exit 2 with a message saying the
disk is full (or the size limit was reached) and that nothing was written, and leave nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parents[1]  # tests/: tiny_models and gguf_helpers for the child
KILLS_PER_COMMAND = 5
DISK_BYTES = 8192
FILE_LIMIT_BYTES = 2048  # below every output's largest file (the micro adapter's weights are ~3.8 KB)


# ------------------------------------------------------------------------------------- zygote


def zygote() -> None:
    """Read JSON requests on stdin, fork a child per request running ``cli.main(argv)``, answer
    with the child's fate on stdout. Request: ``{"argv": [...], "delay": s|null, "log": path,
    "fsize": bytes|null}``; answer: ``{"killed": bool, "rc": int|null, "seconds": s}``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("CI", "1")  # no progress bars
    import gguf  # noqa: F401
    import onnx  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import qalora_export.core.adapter  # noqa: F401
    import qalora_export.formats.gguf.write  # noqa: F401
    import qalora_export.formats.gptq.write  # noqa: F401
    import qalora_export.formats.onnx.write  # noqa: F401
    import qalora_export.quantization.quantize  # noqa: F401
    import qalora_export.training.train  # noqa: F401
    from qalora_export import cli

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if "warm" in req:  # run the commands once in a probe child, then import what they imported
            _warm(req["warm"], req["log"])
            print(json.dumps({"warm": True}), flush=True)
            continue
        t0 = time.monotonic()
        pid = os.fork()
        if pid == 0:  # child: the CLI, output to a log file
            try:
                fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                if req.get("fsize"):
                    import resource

                    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG
                    resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], req["fsize"]))
                torch.set_num_threads(1)
                rc = cli.main(req["argv"])
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                import traceback

                traceback.print_exc()
                rc = 99
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
        if req.get("delay") is not None:
            deadline = t0 + req["delay"]
            while time.monotonic() < deadline:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                time.sleep(0.002)
            else:
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
        else:
            _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        rc = None if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"killed": killed, "rc": rc, "seconds": time.monotonic() - t0}), flush=True)


def _warm(argvs: list[list[str]], log: str) -> None:
    """Lazy imports (transformers' tokenizers, onnx helpers, accelerate, ...) happen on first use;
    a probe child runs every command once and reports its new modules, which the zygote then
    imports, so that forked children spend their time in the command, not in imports."""
    import importlib

    from qalora_export import cli

    listing = log + ".modules"
    pid = os.fork()
    if pid == 0:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        before = set(sys.modules)
        for argv in argvs:
            try:
                cli.main(argv)
            except BaseException:  # noqa: BLE001 - only warming
                pass
        Path(listing).write_text("\n".join(sorted(set(sys.modules) - before)))
        os._exit(0)
    os.waitpid(pid, 0)
    for name in Path(listing).read_text().split():
        try:
            importlib.import_module(name)
        except BaseException:  # noqa: BLE001 - some modules only import in context
            pass


class Zygote:
    def __init__(self):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen([sys.executable, __file__, "zygote"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        assert json.loads(self.proc.stdout.readline())["ready"]

    def run(self, argv: list[str], log: Path, delay: float | None = None, fsize: int | None = None) -> dict:
        self.proc.stdin.write(json.dumps({"argv": argv, "delay": delay, "log": str(log), "fsize": fsize}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def warm(self, argvs: list[list[str]], log: Path) -> None:
        self.proc.stdin.write(json.dumps({"warm": argvs, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        assert json.loads(self.proc.stdout.readline())["warm"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


# ----------------------------------------------------------------------------------- fixtures


def tree_hashes(*roots: Path) -> dict[str, str]:
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    import gguf_helpers
    import tiny_models

    root = tmp_path_factory.mktemp("faults")
    base = gguf_helpers.make_bpe_base(root / "base", bits=4, group_size=32, hidden=32, layers=1, heads=2,
                                      kv_heads=1, intermediate=64, tie_embeddings=True)
    adapter = tiny_models.make_random_adapter(base, root / "adapter", rank=2)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"count to {i}", "output": " ".join(map(str, range(i)))}) + "\n"
                            for i in range(1, 13)))
    return {"root": root, "base": base, "float": Path(str(base) + "-float"), "adapter": adapter, "data": data}


@pytest.fixture(scope="module")
def zyg(inputs):
    z = Zygote()
    z.warm(list(commands(inputs, inputs["root"] / "warm").values()), inputs["root"] / "warm.log")
    yield z
    z.close()


def commands(inp: dict[str, Path], out: Path) -> dict[str, list[str]]:
    b, a = str(inp["base"]), str(inp["adapter"])
    return {
        # --no-verify: the weight level and the handoff bundle are written, the runtime level is not run
        "gptq": ["merge", b, a, "--to", "gptq", "-o", str(out / "merged-gptq"), "--overwrite", "--no-verify"],
        "onnx": ["onnx", b, a, "-o", str(out / "model-onnx"), "--overwrite", "--no-verify"],
        "gguf": ["gguf", b, a, "-o", str(out / "model.gguf"), "--overwrite", "--no-verify"],
        "quantize": ["quantize", str(inp["float"]), "-o", str(out / "quantized"), "--bits", "4", "--group-size", "32",
                     "--overwrite"],
        "train": ["train", b, "--data", str(inp["data"]), "-o", str(out / "trained"), "--steps", "3", "--batch-size",
                  "2", "--rank", "2", "--max-length", "48", "--held-out", "2", "--overwrite"],
    }


def output_of(argv: list[str]) -> Path:
    return Path(argv[argv.index("-o") + 1])


def snapshot(path: Path, inp: dict, kind: str):
    """What a complete output holds (to compare a survivor with the reference run's)."""
    if kind == "quantize":
        from qalora_export.checkpoint.gptq import GPTQCheckpoint

        return GPTQCheckpoint(path).fingerprint()
    if kind == "train":
        from qalora_export.checkpoint.adapter_files import load_adapter

        ad = load_adapter(path)
        return {n: (l.lora_A.tolist(), l.lora_B.tolist()) for n, l in ad.layers.items()}
    from qalora_export.verify import verify_artifact

    report = verify_artifact(path, inp["base"], inp["adapter"], fmt=kind, runtime=False)
    assert report["passed"], report["weights"]
    return True


def not_logs(directory: Path) -> list[str]:
    """Entries of ``directory`` except train's metrics log: it streams one row per step while
    training (``<output>.metrics.jsonl``, qalora_export/training/metrics_log.py) and a killed or failed
    run keeps the rows it logged, by design; it is a log, not the output."""
    return sorted(p.name for p in directory.iterdir() if not p.name.endswith(".metrics.jsonl"))


def siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


# --------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("kind", ["gptq", "onnx", "gguf", "quantize", "train"])
def test_sigkill_leaves_nothing_or_a_complete_output(inputs, zyg, kind, tmp_path):
    before = tree_hashes(inputs["base"], inputs["float"], inputs["adapter"], inputs["data"])
    argv = commands(inputs, tmp_path)[kind]
    out = output_of(argv)
    full = zyg.run(argv, tmp_path / "full.log")
    assert full["rc"] == 0, (tmp_path / "full.log").read_text()[-3000:]
    reference = snapshot(out, inputs, kind)
    rng = random.Random(f"{kind}-{os.getpid()}-{time.time()}")
    outcomes = []
    for i in range(KILLS_PER_COMMAND):
        if i % 2 == 0 and out.exists():  # half the runs start from an empty output path
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        # the first kill lands in the first half of a run (later runs start warm and finish sooner
        # than the first, so delays up to 1.2x its time could all miss); the others anywhere
        delay = rng.uniform(0, (0.5 if i == 0 else 1.2) * full["seconds"])
        res = zyg.run(argv, tmp_path / f"kill{i}.log", delay=delay)
        outcomes.append((round(delay, 3), res["killed"], out.exists()))
        if not res["killed"]:
            assert res["rc"] == 0, (tmp_path / f"kill{i}.log").read_text()[-3000:]
        if out.exists():
            assert snapshot(out, inputs, kind) == reference, f"survivor after a kill at {delay:.3f}s differs"
        visible = [n for n in not_logs(tmp_path) if not n.startswith(".") and not n.endswith(".log")]
        # a .gguf's handoff bundle is its sibling NAME.gguf.bundle, moved in just before the file
        # (qalora_export/storage/atomic.py, atomic_output_group): a kill between the two renames leaves the
        # bundle alone, never a model file without its bundle
        bundle = out.name + ".bundle"
        assert visible in ([], [out.name], [out.name, bundle], [bundle]), visible
        assert all(s.endswith((".partial", ".old")) for s in siblings(out)), siblings(out)
    assert any(k for _, k, _ in outcomes), f"no run was killed: {outcomes}"
    final = zyg.run(argv, tmp_path / "final.log")  # a new run removes what killed runs left
    assert final["rc"] == 0
    assert siblings(out) == [], siblings(out)
    assert snapshot(out, inputs, kind) == reference
    assert tree_hashes(inputs["base"], inputs["float"], inputs["adapter"], inputs["data"]) == before, "an input changed"


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory):
    """(directory, fsize): a mounted 8 KiB tmpfs, or a plain directory and an RLIMIT_FSIZE."""
    d = tmp_path_factory.mktemp("small-disk")
    mounted = os.geteuid() == 0 and shutil.which("mount") and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(d)], capture_output=True).returncode == 0
    yield d, None if mounted else FILE_LIMIT_BYTES
    if mounted:
        subprocess.run(["umount", str(d)], check=False)


@pytest.mark.parametrize("kind", ["gptq", "onnx", "gguf", "quantize", "train"])
def test_disk_full_is_a_clear_error_and_leaves_nothing(inputs, zyg, small_disk, kind, tmp_path):
    disk, fsize = small_disk
    argv = commands(inputs, disk / kind)[kind]
    (disk / kind).mkdir(exist_ok=True)
    res = zyg.run(argv, tmp_path / "run.log", fsize=fsize)
    log = (tmp_path / "run.log").read_text()
    assert res["rc"] == 2, log[-3000:]
    reason = "the disk is full" if fsize is None else "the file size limit was reached"
    assert reason in log and "nothing was written" in log, log[-3000:]
    assert not_logs(disk / kind) == [], list((disk / kind).iterdir())


@pytest.mark.parametrize("kind", ["gptq", "onnx", "gguf", "quantize", "train"])
def test_file_size_limit_is_a_clear_error_and_leaves_nothing(inputs, zyg, kind, tmp_path):
    """``ulimit -f`` (RLIMIT_FSIZE, SIGXFSZ ignored): EFBIG, reported as the size limit."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    res = zyg.run(commands(inputs, out_dir)[kind], tmp_path / "run.log", fsize=FILE_LIMIT_BYTES)
    log = (tmp_path / "run.log").read_text()
    assert res["rc"] == 2, log[-3000:]
    assert "the file size limit was reached" in log and "nothing was written" in log, log[-3000:]
    assert not_logs(out_dir) == []


if __name__ == "__main__" and sys.argv[1:] == ["zygote"]:
    zygote()
