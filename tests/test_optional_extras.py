"""The core imports and trains with none of the optional integrations installed (lightning, wandb, mlflow,
datasets, huggingface_hub): each is imported only where it is used."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("lightning", "pytorch_lightning", "wandb", "mlflow", "datasets", "huggingface_hub")


def test_core_works_with_the_extras_blocked(tmp_path):
    code = textwrap.dedent(f"""
        import importlib.abc, sys, json
        BLOCKED = {BLOCKED!r}

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked: {{name}}")
                return None

        sys.meta_path.insert(0, Block())
        import selfsup, selfsup.cli.app, selfsup.training.loop, selfsup.artifacts.hub, selfsup.training.trackers, selfsup.data.hf
        import selfsup.training.init_weights, selfsup.training.runs, selfsup.artifacts.export, selfsup.training.lightning_ckpt
        selfsup.cli.app.build_parser()
        code = selfsup.cli.app.main(["pretrain", "--dataset", "embedded", "--out", {str(tmp_path / 'run')!r}, "--steps", "1",
                                 "--batch-size", "8", "--backbone", "resnet18", "--set", "backbone_width=0.0625",
                                 "--set", "knn_monitor=false", "--no-progress"])
        hub = selfsup.cli.app.main(["export", "--run", {str(tmp_path / 'run')!r}, "--to", "hub", "--out", {str(tmp_path / 'hub')!r}])
        enc = selfsup.load_encoder({str(tmp_path / 'hub')!r})
        wandb = selfsup.cli.app.main(["pretrain", "--dataset", "embedded", "--out", {str(tmp_path / 'w')!r}, "--steps", "1",
                                  "--logger", "wandb", "--no-progress"])
        try:
            import selfsup.lightning
            lightning = "imported"
        except ImportError:
            lightning = "ImportError"
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print(json.dumps({{"pretrain": code, "hub": hub, "wandb": wandb, "lightning": lightning, "loaded": loaded,
                           "features": enc.num_features}}))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"pretrain": 0, "hub": 0, "wandb": 2, "lightning": "ImportError", "loaded": [], "features": 32}
    assert "--logger wandb needs the wandb package; pip install 'selfsup[wandb]'" in done.stderr
