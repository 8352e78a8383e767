"""The drop-in paths for other projects (docs/design.md §5): ``fastbegan.optimize`` and the
``torch.compile(model, backend="fastbegan")`` backend.

Both find the same patterns and replace them by :func:`fastbegan.ops.conv3x3_elu`:

    [2x nearest upsample] -> Conv2d(3x3, padding 1, stride 1|2, dilation 1, groups 1,
    padding_mode "zeros", bias or not) -> ELU(alpha 1)

and ``upsample -> conv`` without an ELU after it (``activation=False``); anything else is
left alone, with the reason in the report. :func:`optimize` swaps modules inside
``nn.Sequential`` containers (``state_dict()`` unchanged); :func:`compile_backend` is an FX
pass over the graph dynamo captured (patterns in ``forward`` too), then inductor.
"""
from .graph import RewriteReport, compile_backend, compile_reports, rewrite_graph
from .patterns import elu_support, upsample_support
from .sequential import OptimizeReport, Replacement, Skipped, optimize

__all__ = ["optimize", "OptimizeReport", "Replacement", "Skipped", "compile_backend",
           "rewrite_graph", "RewriteReport", "compile_reports", "upsample_support", "elu_support"]
