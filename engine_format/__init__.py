"""The engine-directory format (docs/ENGINE_DIR.md, manifest_version 2): the one statement of it that
both sides read. `export` writes directories of this format and `runtime` reads them; both import
this package and never each other. Like `apet_ops`, it knows nothing of either.

- schema.py     the schema engine (Field, check_fields), ManifestError, relative paths, the limits
- manifest.py   the common manifest table (SCHEMA), the rules across fields, `validate`
- files.py      sha256 and the external checkpoint's fingerprint (strict for the writer, lenient
                for the reader)
- families/     each family's manifest facts (its `vision.*` fields and its own section), found by
                the family's name; Qwen2.5-VL's engine index layout
"""

from .families import FamilyFacts, family_facts, known_families
from .files import fingerprint, sha256
from .manifest import SCHEMA, schema_for, transformers_folders, validate
from .schema import (
    FORMAT,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    MAX_DEPTH,
    MAX_FILES,
    MAX_MANIFEST_BYTES,
    SMALL_FILE_BYTES,
    Field,
    ManifestError,
    check_fields,
    check_relative_path,
    lists_folder,
)

__all__ = [
    "FORMAT",
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "MAX_DEPTH",
    "MAX_FILES",
    "MAX_MANIFEST_BYTES",
    "SCHEMA",
    "SMALL_FILE_BYTES",
    "FamilyFacts",
    "Field",
    "ManifestError",
    "check_fields",
    "check_relative_path",
    "family_facts",
    "fingerprint",
    "known_families",
    "lists_folder",
    "schema_for",
    "sha256",
    "transformers_folders",
    "validate",
]
