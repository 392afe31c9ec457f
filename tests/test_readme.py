"""The README's API example runs as written."""

import linecache
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README.md has no python example"
    for i, block in enumerate(blocks):
        scope: dict = {}
        # Under a name of its own whose source linecache holds: inspect.getsource of a class
        # the block defines (instrument() reads a parent's forward) finds the block's lines,
        # not README.md's lines of the same numbers.
        name = f"<README.md python block {i}>"
        linecache.cache[name] = (len(block), None, block.splitlines(True), name)
        exec(compile(block, name, "exec"), scope)  # noqa: S102 - our own README
        if "fastmlp.instrument(" in block:  # "Watch your own model"
            fused = {lin: act for lin, _, act in scope["gpt2"].fastmlp_report.fused}
            assert fused == {f"transformer.h.{i}.mlp.c_fc": "gelu_tanh" for i in range(2)}
            assert len(scope["gpt2"].fastmlp_report.lone) == 7  # 3 Conv1D a block, lm_head
            assert not scope["gpt2"].fastmlp_report.untouched
            fused = {lin: act for lin, _, act in scope["vit"].fastmlp_report.fused}
            assert fused == {f"blocks.{i}.mlp.fc1": "gelu" for i in range(2)}
            assert scope["fc"].count == 8 * 16 * 256 and scope["fc"].kurtosis is not None
            assert scope["fc"].name == "mlp.c_fc" and scope["fc"].dead_fraction is not None
            continue
        # The snapshot is a host copy: the example's reset() afterwards does not touch it.
        assert scope["snap"][5]["activation"].count == 10 * 1000
        assert scope["model"].stats.snapshot()[5]["activation"].count == 0
        assert scope["probe_snap"][6]["weight_grad"].count == 9 * 1000
