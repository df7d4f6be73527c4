"""Not part of the bertfast package: the repository root's guard against being imported as `bertfast`.

Python run from the folder that holds a clone named bertfast (say ~/src, with the clone at ~/src/bertfast) looks
in the current folder first and finds the clone, not the installed package (setuptools' editable installs sit
behind every folder on sys.path: pypa/setuptools#3557). Without this file the clone imports as an empty namespace
package and `from bertfast import BertConfig` fails with "cannot import name 'BertConfig' from 'bertfast' (unknown
location)". With it, `import bertfast` there loads the installed package instead (for an editable install of this
clone: the same files), warns when that package is another copy than this clone, and when bertfast is not
installed fails with an error that says what happened.

Inside the clone (`python -m pytest`, `python -m bertfast.pretrain`) Python finds bertfast/ directly and never reads
this file; wheels and installs do not contain it.
"""
import importlib.machinery
import importlib.util
import os
import sys

_CLONE = os.path.dirname(os.path.abspath(__file__))


def _same_path(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _installed_spec(name):
    """The spec Python would have used for `name` had the clone's parent folder not been searched."""
    parent = os.path.dirname(_CLONE)
    path = [p for p in sys.path if not _same_path(p or os.curdir, parent)]
    for finder in sys.meta_path:
        if finder is importlib.machinery.PathFinder:
            spec = finder.find_spec(name, path)
        elif hasattr(finder, "find_spec"):
            spec = finder.find_spec(name, None)
        else:
            continue
        if spec is not None and spec.has_location and spec.origin and not _same_path(spec.origin, __file__):
            return spec
    return None


if __name__ == "bertfast":
    _spec = _installed_spec(__name__)
    if _spec is None:
        raise ImportError(
            f"`import bertfast` found {_CLONE}, bertfast's source tree, because Python was started in the folder "
            f"that holds it ({os.path.dirname(_CLONE)}), and no installed bertfast was found behind it. Install it "
            f"(`pip install -e {_CLONE}`), or run from inside the clone.", name=__name__)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module  # the import statement returns what sys.modules holds when this file ends
    try:
        _spec.loader.exec_module(_module)
    except BaseException:
        del sys.modules[__name__]
        raise
    if not os.path.realpath(_spec.origin).startswith(os.path.realpath(_CLONE) + os.sep):
        import warnings

        warnings.warn(f"`import bertfast` from {os.path.dirname(_CLONE)}: loaded the installed bertfast "
                      f"({os.path.dirname(_spec.origin)}), not the clone {_CLONE} that sits here.", stacklevel=2)
