"""`builtin:python-docs`: an English corpus that every CPython installation carries, so nothing is downloaded.

Documents, in a fixed order: every pydoc topic (`pydoc_data.topics`), then one document per standard
library module made of its module, class and function docstrings, read with `ast` from the source
files (nothing is imported, so no module runs). Exact duplicates are dropped. The corpus is
deterministic for a given CPython version; its fingerprint records that version.
"""

import ast
import hashlib
import sys
import sysconfig
from pathlib import Path

# Packages of the standard library that are tests, demos or vendored code rather than documentation.
SKIPPED_STDLIB_PARTS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3", "turtledemo", "ensurepip"}
MIN_DOCSTRING_CHARS = 40


def pydoc_topic_documents() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[name].strip() for name in sorted(topics)]


def module_docstring_document(source_file: Path, module_name: str) -> str | None:
    """All docstrings of one module as one document, in source order, headed by the module name."""
    try:
        tree = ast.parse(source_file.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None
    parts = []
    module_doc = ast.get_docstring(tree)
    if module_doc and len(module_doc) >= MIN_DOCSTRING_CHARS:
        parts.append(f"Module {module_name}\n\n{module_doc.strip()}")
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= MIN_DOCSTRING_CHARS and not node.name.startswith("_"):
                kind = "class" if isinstance(node, ast.ClassDef) else "function"
                parts.append(f"{module_name}.{node.name} ({kind})\n\n{doc.strip()}")
    return "\n\n".join(parts) if parts else None


def stdlib_docstring_documents() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    documents = []
    for source_file in sorted(stdlib.rglob("*.py")):
        relative = source_file.relative_to(stdlib)
        if SKIPPED_STDLIB_PARTS.intersection(relative.parts) or any(part.startswith("test_") for part in relative.parts):
            continue
        module_name = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
        document = module_docstring_document(source_file, module_name)
        if document:
            documents.append(document)
    return documents


def python_docs_documents() -> list[str]:
    """The deduplicated documents of `builtin:python-docs`, in their fixed order."""
    seen = set()
    documents = []
    for text in pydoc_topic_documents() + stdlib_docstring_documents():
        key = hashlib.sha256(" ".join(text.split()).encode()).digest()
        if key not in seen:
            seen.add(key)
            documents.append(text)
    return documents


def python_docs_version() -> str:
    return f"cpython-{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
