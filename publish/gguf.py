"""`python -m publish model DIR --to TARGET --gguf q8_0`: the model as a GGUF file, with its Ollama
`Modelfile`, in the published repo beside the safetensors (both pushed through git-lfs / the Hub).

    extra = gguf_bundle(model_dir, "q8_0", "lumi", workdir)   # {"lumi-q8_0.gguf": Path, "Modelfile": Path}

The exporter lives in trainer/ and publish imports only the core (tests/test_layers.py), so it runs
as the command a user would type, `python -m trainer export-gguf`, writing into `workdir` (a temp dir
under $TMPDIR that publish removes afterwards). Its one-line refusal (an adapter dir, an architecture
or quant it cannot write, a template it cannot translate) becomes publish's, before anything is pushed.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from inference.errors import UserError

ROOT = Path(__file__).resolve().parents[1]          # the repo root, so `-m trainer` works uninstalled too


def gguf_bundle(model_dir, quant: str, name: str, workdir: Path, echo=print) -> dict[str, Path]:
    out = Path(workdir) / f"{name}-{quant}.gguf"
    echo(f"exporting {out.name} (python -m trainer export-gguf --quant {quant})")
    r = subprocess.run([sys.executable, "-m", "trainer", "export-gguf", str(Path(model_dir).resolve()), str(out),
                        "--quant", quant], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        lines = r.stderr.strip().splitlines() or [f"export-gguf exited with {r.returncode}"]
        errors = [line for line in lines if line.startswith("error: ")]
        raise UserError(f"--gguf {quant}: {(errors or lines)[-1].removeprefix('error: ')}")
    return {out.name: out, "Modelfile": out.parent / "Modelfile"}
