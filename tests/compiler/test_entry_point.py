"""backend="effc" is found through the torch_dynamo_backends entry point, without `import effc`,
and `import effc` registers it where no entry point is installed."""

import subprocess
import sys
import textwrap

import pytest


@pytest.mark.slow
def test_backend_found_by_name_in_a_fresh_interpreter():
    code = textwrap.dedent("""
        import sys, torch
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        x = torch.randn(4, 8)
        with torch.no_grad():
            out = torch.compile(model, backend="effc")(x)
            assert torch.equal(out, model(x))
        assert "effc" in torch._dynamo.list_backends()
        import effc.compiler.backend as backend
        print("graphs", len(backend.SESSION.graphs))
    """)
    # -I: isolated mode, so neither the test's sys.path nor the working directory leak in.
    proc = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                          timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("graphs 1")


@pytest.mark.slow
def test_import_registers_the_backend_where_no_entry_point_exists():
    """A checkout on PYTHONPATH (a GPU machine, a notebook) has no installed entry point:
    `import effc` registers the backend itself."""
    code = textwrap.dedent("""
        import importlib.metadata as md, torch
        real = md.entry_points
        md.entry_points = lambda **kw: (md.EntryPoints([])
                                        if kw.get("group") == "torch_dynamo_backends"
                                        else real(**kw))
        assert "effc" not in torch._dynamo.list_backends(exclude_tags=())
        import effc
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
        x = torch.randn(4, 8)
        with torch.no_grad():
            assert torch.equal(torch.compile(model, backend="effc")(x), model(x))
        print("registered", "effc" in torch._dynamo.list_backends(exclude_tags=()))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "registered True"
