"""The public API at the package root: the README's Python example, the lazy exports."""

import torch

from diffprune.patch import TaskPatch
from patch_helpers import random_patch


def test_the_readme_python_example_runs(own_vocab_dir, tmp_path):
    """The README's Python API example, run as written, on the tiny model and a patch for it."""
    import re
    from pathlib import Path

    import diffprune

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme[readme.index("**Python API.**"):], re.S).group(1)
    where = '"runs/mrpc-diff-struct/patch.safetensors"'
    assert "diffprune.load_base()" in code and where in code
    base = diffprune.load_base(own_vocab_dir)
    patch, _, _ = random_patch(base)
    patch.save(tmp_path / "p.safetensors")
    code = code.replace("diffprune.load_base()", f"diffprune.load_base({str(own_vocab_dir)!r})")
    namespace = {}
    exec(compile(code.replace(where, repr(str(tmp_path / "p.safetensors"))), "README.md", "exec"), namespace)

    inputs = namespace["inputs"]
    with torch.no_grad(), TaskPatch.load(tmp_path / "p.safetensors").apply(base):
        assert torch.equal(namespace["logits"], base.model.eval()(**inputs).logits)
        unpatched = namespace["base"].model(**inputs).logits  # reverted: the base as loaded
    assert not torch.equal(unpatched, namespace["logits"])
    fresh = dict(base.model.named_parameters())
    assert all(torch.equal(p, fresh[n]) for n, p in namespace["base"].model.named_parameters())


def test_the_package_root_exports_the_api_without_importing_torch():
    import subprocess
    import sys

    code = ("import sys, diffprune; assert 'torch' not in sys.modules, 'eager import'; "
            "from diffprune import DiffpruneError, TaskPatch, TrainSettings, __version__, evaluate_patch, load_base, train; "
            "import diffprune.api as api, diffprune.base as base, diffprune.patch as patch; "
            "assert (train, evaluate_patch, load_base, TaskPatch) == (api.train, api.evaluate_patch, base.load_base, "
            "patch.TaskPatch); assert TrainSettings is api.TrainSettings and set(diffprune.__all__) <= set(dir(diffprune))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
