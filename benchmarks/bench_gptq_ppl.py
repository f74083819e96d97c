"""Perplexity of our GPTQ against GPTQModel's on the SmolLM2-135M-Instruct fixture.

For each bit width (group size 32 by default, asymmetric, no act-order), on the SAME calibration
windows (``gptq_quant.calibration_batch`` over the standard library's docstrings,
``CALIBRATION_MODULES``), this quantizes the float fixture with:

- min-max RTN (``quantize --method rtn``): no data, the floor every GPTQ should beat;
- our GPTQ (``quantize --method gptq``, damping 0.01, layer by layer, float32 activations), the
  same with float16 activation storage, with damping 0.05, with ``--group-aware-order`` (damping
  0.01 and 0.05), and with ``--group-aware-order --true-sequential`` at damping 0.05 (GPTQModel's
  default algorithm);
- GPTQModel 7.6 matched to ours (``damp_percent=0.01``, ``act_group_aware=False``: plain GPTQ
  column order, model loaded in float32), and with its defaults (``damp_percent=0.05``,
  ``act_group_aware=True``, its default dtype, bfloat16 on CPU), each in its own process, saved
  as ``gptq_v2``;

then measures perplexity on held-out text: docstrings of *other* standard-library modules
(``HELD_OUT_MODULES``), minus any docstring that also occurs in the calibration text, cut into
non-overlapping windows. Every quantized checkpoint is evaluated the same way: decoded by the
project's reader (exact: fp16 scales widened, float32 compute; the reader's decode of GPTQModel
checkpoints equals GPTQModel's own, ``tests/e2e/test_gptq_golden.py``) with the float embeddings,
norms and head stored as fp16 by both tools.

``--runtime-check`` also evaluates the matched GPTQModel checkpoint in transformers + GPTQModel.
Nothing is downloaded. Usage (about 20 minutes on 2 idle CPU cores for one bit width)::

    python benchmarks/bench_gptq_ppl.py --bits 4,2 --workdir /tmp/bench-gptq-ppl --runtime-check

Each checkpoint and each result is cached in ``--workdir`` (delete a file to redo it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HELD_OUT_MODULES = (
    "asyncio", "ast", "base64", "calendar", "codecs", "configparser", "email", "fnmatch", "ftplib", "getopt",
    "gettext", "glob", "gzip", "hashlib", "hmac", "html", "http.client", "imaplib", "io", "ipaddress",
    "locale", "mailbox", "mimetypes", "numbers", "operator", "optparse", "pickle", "plistlib", "queue",
    "sched", "secrets", "selectors", "shlex", "smtplib", "socket", "sqlite3", "struct", "subprocess",
    "tarfile", "threading", "tokenize", "types", "uuid", "warnings", "weakref", "xml.dom.minidom",
)

GPTQMODEL_SCRIPT = r"""
import json, sys
import torch
from gptqmodel import GPTQModel, QuantizeConfig
src, out, bits, group_size, damp, gar, dtype, ids_file = sys.argv[1:9]
windows = json.load(open(ids_file))
calibration = [{"input_ids": w, "attention_mask": [1] * len(w)} for w in windows]
kwargs = dict(bits=int(bits), group_size=int(group_size), desc_act=False, sym=False, format="gptq_v2")
if damp != "default":
    kwargs["damp_percent"] = float(damp)
if gar != "default":
    kwargs["act_group_aware"] = gar == "1"
config = QuantizeConfig(**kwargs)
print("GPTQModel QuantizeConfig:", {k: getattr(config, k) for k in
      ("bits", "group_size", "desc_act", "sym", "damp_percent", "act_group_aware", "mse", "static_groups")}, flush=True)
model = GPTQModel.load(src, config, **({} if dtype == "auto" else {"dtype": getattr(torch, dtype)}))
model.quantize(calibration, batch_size=4, calibration_sort=None)
model.save(out)
"""


def held_out_windows(tokenizer, seq_len: int, n_windows: int) -> torch.Tensor:
    """``[n, seq_len]`` token windows of held-out stdlib docstrings none of which is calibration text."""
    from qalora_export.quantization.gptq import stdlib_docstrings

    seen = set(stdlib_docstrings())
    docs = [d for d in dict.fromkeys(stdlib_docstrings(HELD_OUT_MODULES)) if d not in seen]
    ids = tokenizer("\n\n".join(docs), add_special_tokens=False)["input_ids"]
    n = min(n_windows, len(ids) // seq_len)
    if n < 1:
        raise SystemExit(f"held-out text has {len(ids)} tokens, fewer than one window of {seq_len}")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch: int = 2) -> float:
    """exp(mean next-token cross-entropy) over every position of every window."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch):
        ids = windows[start:start + batch]
        logits = model(input_ids=ids).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                 reduction="sum")
        total += float(loss)
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def checkpoint_perplexity(path: Path, windows: torch.Tensor) -> float:
    from qalora_export.training.evaluate import cached_base_weights
    from qalora_export.modeling.model import build_model

    model = build_model(path)
    with cached_base_weights(model):
        return perplexity(model, windows)


def runtime_perplexity(path: Path, windows: torch.Tensor) -> float:
    """The checkpoint loaded by transformers + GPTQModel (gptq_torch, float32 activations; it
    dequantizes in fp16), torch.compile off (it would recompile per shape on CPU)."""
    from qalora_export.formats.gptq.runtime import load_gptq_model

    with torch._dynamo.config.patch(disable=True):
        return perplexity(load_gptq_model(path), windows)


def float_perplexity(float_dir: Path, windows: torch.Tensor) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(float_dir), dtype=torch.float32)
    return perplexity(model, windows)


def run_gptqmodel(float_dir: Path, out: Path, bits: int, group_size: int, damp: str, gar: str, dtype: str,
                  ids_file: Path, log: Path) -> None:
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS", "2"),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as fh:
        done = subprocess.run([sys.executable, "-c", GPTQMODEL_SCRIPT, str(float_dir), str(out), str(bits),
                               str(group_size), damp, gar, dtype, str(ids_file)], env=env, stdout=fh,
                              stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"GPTQModel failed ({done.returncode}); see {log}")


def cached(path: Path, compute) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    result = compute()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", default="4", help="comma-separated bit widths, e.g. 4,2")
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--samples", type=int, default=32, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration / evaluation window")
    parser.add_argument("--eval-windows", type=int, default=16, help="held-out windows for perplexity")
    parser.add_argument("--workdir", type=Path, default=Path("bench-gptq-ppl"))
    parser.add_argument("--skip-gptqmodel-defaults", action="store_true",
                        help="only run GPTQModel with our damping and column order")
    parser.add_argument("--skip-fp16", action="store_true", help="skip our GPTQ with float16 activation storage")
    parser.add_argument("--skip-orders", action="store_true",
                        help="skip our GPTQ with damping 0.05 and with group-aware order")
    parser.add_argument("--runtime-check", action="store_true",
                        help="also evaluate the matched GPTQModel checkpoint in transformers + GPTQModel")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from qalora_export.fixtures.smollm2 import smollm2_float_dir
    from qalora_export.quantization.gptq import calibration_batch, calibration_text
    from qalora_export.quantization.quantize import quantize_model

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    float_dir = smollm2_float_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(float_dir))
    text = calibration_text()
    calib = calibration_batch(tokenizer, text, args.samples, args.seq_len)
    ids_file = work / f"calibration-{calib.shape[0]}x{args.seq_len}.json"
    ids_file.write_text(json.dumps(calib.tolist()))
    windows = held_out_windows(tokenizer, args.seq_len, args.eval_windows)
    print(f"calibration: {calib.shape[0]} windows x {args.seq_len} tokens of stdlib docstrings; "
          f"held-out: {windows.shape[0]} windows x {args.seq_len} tokens ({len(HELD_OUT_MODULES)} other modules)",
          flush=True)
    tag = f"n{calib.shape[0]}-s{args.seq_len}-e{windows.shape[0]}"
    results: dict[str, dict] = {}
    results["float"] = cached(work / f"float-{tag}.json", lambda: {"ppl": float_perplexity(float_dir, windows)})
    print(f"float: ppl {results['float']['ppl']:.3f}", flush=True)

    for bits in [int(b) for b in args.bits.split(",")]:
        g = args.group_size
        variants = {
            "RTN": dict(kind="ours", method="rtn"),
            "ours GPTQ (damp 0.01)": dict(kind="ours", method="gptq"),
            "GPTQModel (damp 0.01, no GAR, float32)": dict(kind="gptqmodel", damp="0.01", gar="0", dtype="float32"),
        }
        if not args.skip_gptqmodel_defaults:
            variants["GPTQModel defaults (damp 0.05, GAR, bf16)"] = dict(kind="gptqmodel", damp="default",
                                                                         gar="default", dtype="auto")
        if not args.skip_fp16:
            variants["ours GPTQ, fp16 activations"] = dict(kind="ours", method="gptq", calibration_dtype="float16")
        if not args.skip_orders:  # which of GPTQModel's defaults makes its difference
            variants["ours GPTQ (damp 0.05)"] = dict(kind="ours", method="gptq", damp=0.05)
            variants["ours GPTQ, group-aware order (damp 0.01)"] = dict(kind="ours", method="gptq", gar=True)
            variants["ours GPTQ, group-aware order (damp 0.05)"] = dict(kind="ours", method="gptq", gar=True,
                                                                        damp=0.05)
            variants["ours GPTQ, group-aware order, true-sequential (damp 0.05)"] = dict(
                kind="ours", method="gptq", gar=True, damp=0.05, true_sequential=True)
        for label, spec in variants.items():
            slug = "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")
            out = work / f"w{bits}g{g}-{slug}-n{calib.shape[0]}-s{args.seq_len}"

            def compute(spec=spec, out=out, label=label):
                t0 = time.time()
                if not (out / "config.json").is_file():
                    if spec["kind"] == "ours":
                        kwargs = {}
                        if spec["method"] == "gptq":
                            kwargs = dict(calibration=text, n_samples=args.samples, seq_len=args.seq_len,
                                          calibration_dtype=spec.get("calibration_dtype"),
                                          damp=spec.get("damp", 0.01), group_aware_order=spec.get("gar", False),
                                          true_sequential=spec.get("true_sequential", False))
                        quantize_model(float_dir, out, bits, g, method=spec["method"], overwrite=True, **kwargs)
                    else:
                        run_gptqmodel(float_dir, out, bits, g, spec["damp"], spec["gar"], spec["dtype"], ids_file,
                                      work / f"{out.name}.log")
                seconds = time.time() - t0
                return {"ppl": checkpoint_perplexity(out, windows), "quantize_seconds": seconds, "path": str(out)}

            results[f"{bits}-bit {label}"] = cached(work / f"{out.name}-{tag}.json", compute)
            r = results[f"{bits}-bit {label}"]
            print(f"{bits}-bit g{g} {label}: ppl {r['ppl']:.3f} (quantized in {r['quantize_seconds']:.0f}s)", flush=True)
            if args.runtime_check and spec["kind"] == "gptqmodel" and spec["dtype"] == "float32":
                results[f"{bits}-bit {label}, in its own runtime"] = cached(
                    work / f"{out.name}-{tag}-runtime.json",
                    lambda out=out: {"ppl": runtime_perplexity(out, windows), "quantize_seconds": 0.0})
                print(f"  in transformers + GPTQModel: ppl "
                      f"{results[f'{bits}-bit {label}, in its own runtime']['ppl']:.3f}", flush=True)

    print(f"\n| model | perplexity | vs float |\n|---|---|---|")
    ref = results["float"]["ppl"]
    for label, r in results.items():
        print(f"| {label} | {r['ppl']:.3f} | {r['ppl'] / ref:.3f}x |")
    (work / f"summary-{tag}.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
