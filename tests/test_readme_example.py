"""The README's 'Using the code in a few lines' block runs as written (at the smallest model size)."""
import re

from conftest import ROOT


def test_readme_few_lines_example_runs(single_thread):
    text = open(f"{ROOT}/README.md").read()
    block = re.search(r"## Using the code in a few lines\n```python\n(.*?)```", text, re.S).group(1)
    assert 'create_model("SiT-B/2"' in block and "num_steps=250" in block
    # the same calls, sized for a CPU test: the smallest model, two sampler steps
    block = block.replace('"SiT-B/2"', '"SiT-XS/2"').replace("num_steps=250", "num_steps=2")
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    terms = namespace["terms"]
    assert set(terms) >= {"loss_final", "loss_mean", "proj_loss", "loss_mean_cls", "proj_loss_raw", "loss_mean_cls_raw", "grad_norm",
                          "finite"}
    assert bool(terms["finite"]) and namespace["state"].step == 1
    assert namespace["z"].shape == (8, 4, 32, 32)
