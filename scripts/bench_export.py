"""Time and memory of GGUF export (not a test: a 0.5B model takes about a minute per quant).

Exports one model folder to each GGUF type, each in its own process, and
prints wall time, CPU time, file size and the export process's peak RSS
(`ru_maxrss` of that process alone, so one quant's peak does not hide
another's). The export streams row chunks, so peak RSS should stay far below
the model's float32 size (4 bytes x parameters).

    edgetune model tiny /tmp/q05 --preset qwen2.5-0.5b     # random bf16 weights, ~40 s
    python scripts/bench_export.py /tmp/q05                # f16, q8_0, q4_0 into a temp folder
    python scripts/bench_export.py /tmp/q05 --quant q4_0 --out /tmp/q05-gguf
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def export_once(model_dir: Path, out_file: Path, quant: str) -> dict:
    """Run in the child: one export, then this process's own numbers."""
    from edgetune.export.gguf import write_gguf

    start, cpu = time.perf_counter(), time.process_time()
    result = write_gguf(model_dir, out_file, quant, echo=lambda _: None)
    return {**result, "wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--quant", action="append", help="repeatable; default f16, q8_0, q4_0")
    ap.add_argument("--out", type=Path, help="folder for the .gguf files (default: a temp folder, deleted)")
    ap.add_argument("--child", nargs=2, metavar=("QUANT", "OUT_FILE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(export_once(args.model_dir, Path(args.child[1]), args.child[0])))
        return

    config = json.loads((args.model_dir / "config.json").read_text())
    params = sum(f.stat().st_size for f in args.model_dir.glob("model*.safetensors"))
    print(f"{args.model_dir} ({config['model_type']}, {config.get('torch_dtype')}, {params / 2**20:,.0f} MiB of "
          f"safetensors)")
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.out or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        print(f"{'quant':6} {'wall s':>7} {'cpu s':>7} {'size MiB':>9} {'peak RSS MiB':>13}  tensor types")
        for quant in args.quant or ["f16", "q8_0", "q4_0"]:
            out_file = out_dir / f"{args.model_dir.name}-{quant}.gguf"
            child = subprocess.run([sys.executable, __file__, str(args.model_dir), "--child", quant, str(out_file)],
                                   capture_output=True, text=True)
            if child.returncode != 0:
                sys.exit(f"{quant}: export failed\n{child.stderr}")
            r = json.loads(child.stdout.splitlines()[-1])
            print(f"{quant:6} {r['wall_s']:7.1f} {r['cpu_s']:7.1f} {r['size_bytes'] / 2**20:9.1f} "
                  f"{r['peak_rss_mib']:13.0f}  {r['tensor_types']}")


if __name__ == "__main__":
    main()
