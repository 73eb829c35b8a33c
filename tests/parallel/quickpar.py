"""Run chosen parity rows in one torchrun launch and compare each to its single process
(development aid, not collected by pytest): python tests/parallel/quickpar.py NPROC row1,row2"""
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import tests.parallel.test_parity as tp   # noqa: E402
from tests.parallel.layouts import run_layout   # noqa: E402
from webdataset import TarWriter   # noqa: E402


def corpus(tmp: Path) -> str:   # test_parity.corpus without pytest's fixture
    path = tmp / "docs-0000.tar"
    with TarWriter(str(path)) as w:
        for i in range(13):
            w.write({"__key__": f"d{i:02d}", "txt": f"def f{i}(x):\n    return x * {i}\n".ljust(30).encode()})
    return json.dumps([str(path)]).replace(" ", "")


if __name__ == "__main__":
    n, names = int(sys.argv[1]), sys.argv[2].split(",")
    src = {**tp.TWO_RANKS, **tp.FOUR_RANKS}
    tmp = Path(tempfile.mkdtemp())
    docs = corpus(tmp)
    lay = {k: src[k] for k in names}
    out = tp.launch(n, lay, tmp, timeout=900, corpus=docs)
    for k in names:
        ref = run_layout(tempfile.mkdtemp() + "/s", tp.model_args(lay[k].replace("CORPUS", docs)))
        got = out[k]
        if "error" in got:
            print(k, "ERROR", got["error"][-2000:])
            continue
        d = max(abs(a - b) / abs(b) for a, b in zip(got["loss"], ref["loss"]))
        g = max(abs(a - b) / abs(b) for a, b in zip(got["grad_norm"], ref["grad_norm"]))
        print(k, "loss rel", d, "gn rel", g, "losses", [round(x, 4) for x in ref["loss"][:3]])
