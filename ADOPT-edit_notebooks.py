"""Markdown edits of S8_BatchNorm.ipynb / S8_GroupNorm.ipynb for the stack (branch adopt-stack only).
Run in the checkout AFTER the notebook executed: python ADOPT-edit_notebooks.py bn|gn"""
import json
import sys
from pathlib import Path

norm = sys.argv[1]
path = Path({"bn": "S8_BatchNorm.ipynb", "gn": "S8_GroupNorm.ipynb"}[norm])
nb = json.loads(path.read_text())
md = {i: "".join(c["source"]) for i, c in enumerate(nb["cells"]) if c["cell_type"] == "markdown"}


def edit(i, old, new):
    assert md[i].count(old) == 1, (i, old)
    md[i] = md[i].replace(old, new)
    nb["cells"][i]["source"] = md[i].splitlines(keepends=True)


statistics = {"bn": "For BatchNorm the average carries the running mean and variance along too.",
              "gn": "GroupNorm keeps no running statistics, so only weights are averaged."}[norm]
lifted = {"bn": "two of BatchNorm's three seeds and all three of GroupNorm's",
          "gn": "all three of GroupNorm's seeds and two of BatchNorm's three"}[norm]
edit(11, "This notebook trains the **`separable` build** (`recipe.build`, defined in `model.BUILDS`).",
     "This notebook trains the **`separable-skips` build** (`recipe.build`, defined in `model.BUILDS`): "
     "the `separable` build described here with additive skips, `x + block(x)`, around every block that "
     "keeps its input's shape (c3, C4, C5); a skip costs no parameters and gives the gradient a short path.")
edit(15, "\n\nThe whole recipe is one object",
     "\n- **A whitened C1** (`whiten_c1=True`, from cifar10-airbench): C1's filters start as a whitening of "
     "3x3 patches of the training images (`utils.whiten_init`), pairs of +/- eigenvector filters scaled to "
     "equal variance, so the first layer passes the images' strongest patterns, decorrelated, from the first "
     "step on. Training is otherwise unchanged.\n"
     "- **A moving average of the weights** (`ema=0.999`): every step also updates an average of the weights, "
     f"and the model tested at the end is that average, which smooths out the noise of the last steps. {statistics}\n"
     "- The skips, the whitened C1 and the average each ended within the seed spread alone; stacked, they "
     f"lifted {lifted} over the earlier recipe's run of the same seed (README section 6)."
     "\n\nThe whole recipe is one object")
path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
