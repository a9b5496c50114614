"""Render Jinja templates into Python files in a build directory and import them.

TileLang's T.prim_func reads its own source, so a rendered kernel must live in a real file;
Triton's @jit also wants inspectable source. Files are named by the hash of their content,
so two configs never collide and a re-render of the same content is free.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import jinja2

TEMPLATE_ROOT = Path(__file__).resolve().parents[2] / "templates"


def _template_root() -> Path:
    # An installed wheel ships templates inside the package; a checkout has them at the top.
    packaged = Path(__file__).resolve().parents[1] / "templates"
    return packaged if packaged.is_dir() else TEMPLATE_ROOT


_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(_template_root())),
    undefined=jinja2.StrictUndefined,  # a missing parameter is an error, never an empty string
    keep_trailing_newline=True,
    trim_blocks=True,
    lstrip_blocks=True,
)


def default_build_dir() -> Path:
    return Path(os.environ.get("SPARSEGEN_BUILD_DIR",
                               Path(tempfile.gettempdir()) / "sparsegen-build"))


def template_source(name: str) -> str:
    """Raw text of a template (hashed into tuning-database keys)."""
    return (_template_root() / name).read_text()


def template_hash(name: str) -> str:
    return hashlib.sha256(template_source(name).encode()).hexdigest()[:16]


def render(name: str, params: dict, source: str | None = None) -> str:
    """Template `name` rendered with params; `source`: render this text in its place (e.g.
    the template as it was at an earlier revision), with the same options."""
    template = _ENV.get_template(name) if source is None else _ENV.from_string(source)
    return template.render(**params)


def render_to_file(name: str, params: dict, build_dir: Path | None = None,
                   source: str | None = None) -> Path:
    text = render(name, params, source)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    stem = Path(name).name.split(".")[0]
    out_dir = Path(build_dir or default_build_dir())
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}_{digest}.py"
    if not path.exists():
        # write-then-rename: concurrent renders of the same content never see a torn file
        fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    return path


def import_file(path: Path):
    name = f"sparsegen_rendered_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def render_and_import(name: str, params: dict, build_dir: Path | None = None):
    return import_file(render_to_file(name, params, build_dir))
