"""Empty MLflow SQLite stores in milliseconds: MLflow migrates one store per test process, tests copy it.

Opening a new ``sqlite:///`` store makes MLflow run its ~70 Alembic migrations, which costs
seconds on two shared cores, once per test that wants a store of its own. :func:`empty_store`
copies an empty store that MLflow itself created and migrated, once per process, with the
default experiment (id 0) removed: MLflow adds it back on the copy's first open, with the
artifact location it would give a new store there (``./mlruns/0`` of the working
directory). A copy is the same database as a new store; only the migrations are not run again.
"""

from __future__ import annotations

import atexit
import shutil
import sqlite3
import tempfile
from pathlib import Path

_TEMPLATE: Path | None = None


def _template() -> Path:
    """The migrated, empty store of this process (made on first use, removed at exit)."""
    global _TEMPLATE
    if _TEMPLATE is None:
        from mlflow.tracking import MlflowClient

        folder = Path(tempfile.mkdtemp(prefix="model-audit-store-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        db = folder / "mlflow.db"
        uri = f"sqlite:///{db}"
        client = MlflowClient(uri, registry_uri=uri)
        client.search_experiments()  # the tracking store: tables, migrations, default experiment
        client.search_registered_models()  # the registry store (same file, checked by its own code)
        with sqlite3.connect(db) as con:
            con.execute("DELETE FROM experiments WHERE experiment_id = 0")
        _TEMPLATE = db
    return _TEMPLATE


def empty_store(folder: Path, name: str = "mlflow.db") -> str:
    """``folder / name`` as an empty MLflow store (made if missing; an existing file is kept); its URI."""
    db = Path(folder) / name
    if not db.exists():
        db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_template(), db)
    return f"sqlite:///{db}"
