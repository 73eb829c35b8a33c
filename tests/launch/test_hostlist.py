import pytest

from launch.hostlist import expand_nodelist, hostnames


@pytest.mark.parametrize("text, hosts", [
    ("n[1-3,7],gpu-a[01-02]", ["n1", "n2", "n3", "n7", "gpu-a01", "gpu-a02"]),
    ("node017", ["node017"]),
    ("a,b[09-11]", ["a", "b09", "b10", "b11"]),
    ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
    ("x[8-10]-ib", ["x8-ib", "x9-ib", "x10-ib"]),
    ("gpu[001-003,010]", ["gpu001", "gpu002", "gpu003", "gpu010"]),
])
def test_expand(text, hosts):
    assert expand_nodelist(text) == hosts


@pytest.mark.parametrize("bad", ["n[1-3", "n1-3]", "n[a-b]", "n[3-1]", "", "n[]"])
def test_bad_lists_name_the_list(bad):
    with pytest.raises(ValueError, match="host list"):
        expand_nodelist(bad)


def test_agrees_with_scontrol_when_present():
    import shutil
    if not shutil.which("scontrol"):
        pytest.skip("scontrol not installed")
    text = "n[1-3,7],gpu-a[01-02]"
    assert hostnames(text) == expand_nodelist(text)
